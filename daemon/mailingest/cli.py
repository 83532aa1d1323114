"""Command line: parse, set up logging, load config, call one function, map errors to exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from mailingest import commands, logs
from mailingest.cli_parser import parser
from mailingest.config import Config, load_config, resolve_config_path
from mailingest.errors import (
    EX_DATAERR,
    EX_OK,
    EX_USAGE,
    STATUS_EXIT,
    DataError,
    MailIngestError,
    worst_exit,
)
from mailingest.output import human_bytes, print_table

if TYPE_CHECKING:
    from mailingest.outgoing import Sent


def _records(args: argparse.Namespace) -> int:
    config = _load_all(args, secrets=False)
    action = args.records_command
    if action == "import":
        path = Path(args.file)
        count = asyncio.run(commands.records_import(config, commands.read_text(path), str(path)))
        sys.stdout.write(f"imported {count} records from {path}\n")
    elif action == "list":
        found = asyncio.run(commands.records_list(config))
        if args.json:
            _emit_json([r.to_json() for r in found])
        else:
            print_table(
                ["id", "kind", "name", "emails"],
                [[r.id, r.kind, r.name, "; ".join(r.emails)] for r in found],
            )
    elif action == "create-from":
        from mailingest import cli_review

        return cli_review.create_from(args, config)
    elif action == "set-email":
        emails = asyncio.run(commands.records_set_email(config, args.id, args.emails))
        sys.stdout.write(f"record {args.id}: {'; '.join(emails)}\n")
    else:
        notes = asyncio.run(
            commands.records_share(config, args.id, args.owner, not args.off, args.by)
        )
        state = "no longer shared" if args.off else "shared"
        sys.stdout.write(f"{args.owner}'s mail with record {args.id}: {state}\n")
        for note in notes:
            sys.stderr.write(f"note: {note}\n")
    return EX_OK


def _load(args: argparse.Namespace, *, secrets: bool = True) -> Config:
    """The config file; ``secrets=False`` for commands that log in nowhere (see
    load_config): they read the store only."""
    config = load_config(resolve_config_path(args.config), secrets=secrets)
    logs.register_secrets(config.secrets())
    fmt = args.log_format or config.daemon.log_format
    logs.configure(fmt, level=10 if args.verbose else 20)
    for account in config.accounts:
        if not account.tls_verify:
            logs.get_logger("mailingest.cli").warning("tls_verify_disabled", account=account.name)
    return config


def _load_all(args: argparse.Namespace, *, secrets: bool = True) -> Config:
    """The config file's accounts and those kept in the database."""
    from mailingest.accounts import effective_config

    config = asyncio.run(effective_config(_load(args, secrets=secrets), secrets=secrets))
    logs.register_secrets(config.secrets())
    return config


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=None) + "\n")


def _fetch(args: argparse.Namespace) -> int:
    config = _load(args)  # the database's accounts are added by commands.fetch (stored)
    live = None
    if sys.stderr.isatty() and not args.json:
        # One line per account on a terminal; rich is imported only once one is drawn.
        from mailingest.live import LiveProgress

        live = LiveProgress(sys.stderr)
    try:
        results = asyncio.run(commands.fetch(config, args.account, progress=live, stored=True))
    finally:
        if live is not None:
            live.close()
    if args.json:
        _emit_json({"accounts": [r.to_json() for r in results]})
    else:
        print_table(
            ["account", "status", "new", "bytes", "deleted", "time", "error"],
            [
                [
                    r.account,
                    r.status,
                    r.new,
                    human_bytes(r.bytes),
                    r.deleted,
                    f"{r.duration_ms / 1000:.1f}s",
                    r.error or "",
                ]
                for r in results
            ],
        )
    return worst_exit([STATUS_EXIT[r.status] for r in results])


def _check(args: argparse.Namespace) -> int:
    config = _load_all(args)
    results = asyncio.run(commands.check(config, args.account))
    if args.json:
        _emit_json({"accounts": results})
    else:
        print_table(
            ["account", "pop3", "messages", "smtp", "capabilities / errors"],
            [
                [
                    r["account"],
                    r["pop3"]["status"],
                    r["pop3"]["messages"] or 0,
                    r["smtp"]["status"] if r["smtp"] else "-",
                    " / ".join(
                        e for e in (r["pop3"]["error"], r["smtp"] and r["smtp"]["error"]) if e
                    )
                    or _login_note(r["pop3"]) + " ".join(r["pop3"]["capabilities"]),
                ]
                for r in results
            ],
        )
    statuses = [r["pop3"]["status"] for r in results]
    statuses += [r["smtp"]["status"] for r in results if r["smtp"]]
    codes = [STATUS_EXIT.get(status, EX_DATAERR) for status in statuses]
    return worst_exit(codes)


def _login_note(pop3: dict[str, Any]) -> str:
    """How an OAuth2 account signed in, before its capabilities: "XOAUTH2, token refreshed: "."""
    token = pop3.get("token")
    if not token:
        return ""
    return f"{pop3['mechanism']}, token {'refreshed' if token['refreshed'] else 'cached'}: "


def _config(args: argparse.Namespace) -> int:
    from mailingest.config_render import render_config

    config = _load(args, secrets=False)
    sys.stdout.write(render_config(config))
    return EX_OK


def _status(args: argparse.Namespace) -> int:
    config = _load_all(args, secrets=False)
    rows = asyncio.run(commands.status(config))
    if args.json:
        _emit_json({"accounts": rows})
    else:
        print_table(
            [
                *("account", "owner", "last poll", "result", "new", "stored"),
                *("paused", "next poll", "next login", "failures", "error"),
            ],
            [
                [
                    r["account"],
                    r["owner"],
                    r["last_poll"] or "never",
                    r["result"] or "-",
                    r["new"],
                    r["stored"],
                    f"yes ({r['pause_reason']})" if r["paused"] else "no",
                    r["next_poll"] or "-",
                    r["next_login"] or "",  # LOGIN-DELAY: blank unless the server set one
                    r["consecutive_failures"],
                    r["error"] or "",
                ]
                for r in rows
            ],
        )
    return EX_OK


def _messages(args: argparse.Namespace) -> int:
    config = _load_all(args, secrets=False)
    if args.unmatched:
        from mailingest import cli_review

        return cli_review.unmatched(args, config)
    found = asyncio.run(
        commands.messages(
            config,
            args.viewer,
            account=args.account,
            label=args.label,
            record=args.record,
            limit=args.limit,
            quarantined=args.quarantined,
        )
    )
    if args.json:
        _emit_json([m.to_json() for m in found])
    else:
        print_table(
            ["id", "account", "dir", "date", "from", "subject", "records", "visibility"],
            [
                [
                    m.id,
                    m.account,
                    m.direction,
                    (m.date or "")[:16],
                    m.sender or "",
                    (m.subject or "")[:50],
                    ",".join(m.records),
                    f"{m.visibility} ({m.reason})",
                ]
                for m in found
            ],
        )
    return EX_OK


def _show(args: argparse.Namespace) -> int:
    config = _load_all(args, secrets=False)
    out = sys.stdout.buffer
    message = asyncio.run(
        commands.show(config, args.id, args.viewer, raw_sink=out.write if args.raw else None)
    )
    if args.raw:
        out.flush()
        return EX_OK
    for key, value in message.to_json().items():
        sys.stdout.write(f"{key:>12}: {value}\n")
    return EX_OK


def _body(path: str) -> str:
    """The body text, UTF-8 whether from a file or stdin (not the locale's encoding)."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the body: {exc}") from exc


def _report_sent(args: argparse.Namespace, sent: Sent) -> int:
    if args.json:
        _emit_json(sent.to_json())
    else:
        sys.stdout.write(
            f"sent {sent.message_id} from {sent.account}; stored as message {sent.id}, "
            f"{sent.visibility} ({sent.reason})\n"
        )
    for refusal in sent.refused:
        sys.stderr.write(f"warning: recipient refused: {refusal}\n")
    return EX_OK


def _send(args: argparse.Namespace) -> int:
    from mailingest import outgoing

    config = _load_all(args)
    body = _body(args.body_file)
    sent = asyncio.run(outgoing.send(config, args.account, args.to, args.cc, args.subject, body))
    return _report_sent(args, sent)


def _reply(args: argparse.Namespace) -> int:
    from mailingest import outgoing

    config = _load_all(args)
    body = _body(args.body_file)
    sent = asyncio.run(outgoing.reply(config, args.id, args.viewer, body, reply_all=args.all))
    return _report_sent(args, sent)


def _run(args: argparse.Namespace) -> int:
    from mailingest.daemon import run_daemon

    config = _load(args)
    return run_daemon(config, config_path=resolve_config_path(args.config))


def _demo(args: argparse.Namespace) -> int:
    from mailingest.demo import run_demo

    logs.configure(args.log_format or "auto", level=10 if args.verbose else 30)
    return asyncio.run(run_demo(sys.stdout, database=args.database))


def _accounts(args: argparse.Namespace) -> int:
    from mailingest import cli_accounts

    return cli_accounts.run(args, lambda: _load(args))


def _release(args: argparse.Namespace) -> int:
    from mailingest import cli_review

    return cli_review.release(args, lambda: _load_all(args))


def _explain(args: argparse.Namespace) -> int:
    from mailingest import cli_review

    return cli_review.explain(args, _load_all(args, secrets=False))


def _audit(args: argparse.Namespace) -> int:
    from mailingest import cli_review

    return cli_review.audit(args, _load_all(args, secrets=False))


def _auth(args: argparse.Namespace) -> int:
    from mailingest import cli_auth

    return cli_auth.run(args, lambda: _load_all(args))


def _api(args: argparse.Namespace) -> int:
    from mailingest import cli_api

    return cli_api.run(args, lambda: _load(args, secrets=False))


_COMMANDS = {
    "run": _run,
    "fetch": _fetch,
    "check": _check,
    "config": _config,
    "status": _status,
    "messages": _messages,
    "records": _records,
    "show": _show,
    "send": _send,
    "reply": _reply,
    "demo": _demo,
    "accounts": _accounts,
    "release": _release,
    "explain": _explain,
    "audit": _audit,
    "auth": _auth,
    "api": _api,
}


def entry() -> NoReturn:
    """The ``mailingest`` command: ``main``, then exit without the interpreter's teardown,
    which frees every object and module one by one (about 40 ms after a fetch, a fifth of
    an empty mailbox's whole run). Nothing is left to it: the store is closed, the
    worker threads are joined and the two streams are flushed here."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # the reader went away (`| head`): not an error of ours
        except OSError as exc:  # a full disk under `fetch --json > file`
            with contextlib.suppress(OSError):
                os.write(2, logs.mask_text(f"mailingest: cannot write output: {exc}\n").encode())
            code = code or 1
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors; sysexits wants 64
        return EX_USAGE if exc.code not in (0, None) else EX_OK
    try:
        return _COMMANDS[args.command](args)
    except MailIngestError as exc:
        sys.stderr.write(logs.mask_text(f"mailingest {args.command}: {exc}\n"))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mailingest messages | head`: the reader went away; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_OK
    except Exception:
        # A bug. Its traceback is for the report, but like log lines it goes through the
        # secret mask: Python's own handler would print an exception text as it is.
        sys.stderr.write(logs.mask_text(traceback.format_exc()))
        return 1

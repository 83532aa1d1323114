"""Command line: parse, set up logging, load config, call one function, map errors to exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from mailingest import __version__, cli_accounts, cli_api, cli_auth, cli_review, commands, logs
from mailingest.config import Config, load_config, resolve_config_path
from mailingest.config_render import render_config
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
from mailingest.progress import LiveProgress

if TYPE_CHECKING:
    from mailingest.outgoing import Sent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailingest",
        description="POP3 mail ingestion for a CRM: durable, byte-exact, shared per CRM rules.",
    )
    parser.add_argument("--version", action="version", version=f"mailingest {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        help="config file (default: $MAILINGEST_CONFIG, else /etc/mailingest/mailingest.toml)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=None,
        help="log format on stderr (default: the config's, else auto)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", help="the daemon (systemd Type=notify)")
    p = sub.add_parser("fetch", help="one cycle for each (selected) account, then exit")
    p.add_argument("--account", action="append", metavar="NAME", help="only this account")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("check", help="connect, TLS, login, STAT; nothing fetched or changed")
    p.add_argument("--account", action="append", metavar="NAME", help="only this account")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("config", help="validate and print the effective config, secrets redacted")
    p = sub.add_parser("status", help="per account: last poll, result, stored count")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("messages", help="what a CRM user may see, newest first")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--account", metavar="NAME")
    p.add_argument("--label", metavar="L")
    p.add_argument("--record", metavar="ID", help="only mail linked to this CRM record")
    p.add_argument("--limit", type=int, metavar="N", help="at most N messages (newest)")
    p.add_argument(
        "--quarantined", action="store_true", help="only mail over its account's size limit"
    )
    p.add_argument(
        "--unmatched",
        action="store_true",
        help="the viewer's incoming mail linked to no record, grouped by sender",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _records_parser(sub)
    cli_accounts.add_parser(sub)
    cli_review.add_parser(sub)
    cli_auth.add_parser(sub)
    cli_api.add_parser(sub)
    p = sub.add_parser("show", help="one message; --raw writes the exact stored bytes")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--raw", action="store_true", help="write the stored bytes to stdout")
    p = sub.add_parser("send", help="send from the CRM over SMTP; stored as outgoing, tagged")
    p.add_argument("--account", required=True, metavar="NAME")
    p.add_argument("--to", required=True, nargs="+", action="extend", metavar="ADDR")
    p.add_argument("--cc", nargs="+", action="extend", default=[], metavar="ADDR")
    p.add_argument("--subject", required=True, metavar="S")
    p.add_argument("--body-file", required=True, metavar="F", help="the body text; - for stdin")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("reply", help="reply to a message you may see, from your primary account")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--body-file", required=True, metavar="F", help="the body text; - for stdin")
    p.add_argument("--all", action="store_true", help="reply to all: the other recipients go in Cc")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser(
        "demo", help="ingest sample mail from a loopback POP3 server; no mailbox needed"
    )
    p.add_argument(
        "--database",
        metavar="URL",
        help="a postgresql:// database to use (empty; password from $PGPASSWORD) instead of "
        "a temporary SQLite file",
    )
    return parser


def _records_parser(sub: Any) -> None:
    records = sub.add_parser("records", help="CRM leads and contacts that mail links to")
    rsub = records.add_subparsers(dest="records_command", required=True, metavar="ACTION")
    p = rsub.add_parser("import", help="upsert records from a CSV (header id,kind,email,name)")
    p.add_argument("file", metavar="FILE.csv")
    p = rsub.add_parser("list", help="the records and their addresses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = rsub.add_parser("set-email", help="change a record's addresses (EMAIL[;EMAIL])")
    p.add_argument("id", metavar="ID")
    p.add_argument("emails", metavar="EMAIL[;EMAIL]")
    p = rsub.add_parser("create-from", help="a record for a message's sender; links its mail")
    p.add_argument("message", type=int, metavar="MESSAGE_ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--id", dest="record_id", metavar="ID", help="default: the sender's address")
    p.add_argument("--kind", choices=["lead", "contact"], default="lead")
    p.add_argument("--name", help="default: the From header's display name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = rsub.add_parser("share", help="custom mode: share USER's mail with this record")
    p.add_argument("id", metavar="ID")
    p.add_argument("--owner", required=True, metavar="USER")
    p.add_argument("--off", action="store_true", help="stop sharing")
    p.add_argument("--by", metavar="USER", help="who asks, for the audit log (default: you)")


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
            structlog.get_logger().warning("tls_verify_disabled", account=account.name)
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
    config = _load_all(args)
    # One line per account on a terminal; rich is imported only once one is drawn.
    live = LiveProgress(sys.stderr) if sys.stderr.isatty() and not args.json else None
    try:
        results = asyncio.run(commands.fetch(config, args.account, progress=live))
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
    return cli_accounts.run(args, lambda: _load(args))


def _release(args: argparse.Namespace) -> int:
    return cli_review.release(args, lambda: _load_all(args))


def _explain(args: argparse.Namespace) -> int:
    return cli_review.explain(args, _load_all(args, secrets=False))


def _audit(args: argparse.Namespace) -> int:
    return cli_review.audit(args, _load_all(args, secrets=False))


def _auth(args: argparse.Namespace) -> int:
    return cli_auth.run(args, lambda: _load_all(args))


def _api(args: argparse.Namespace) -> int:
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
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
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

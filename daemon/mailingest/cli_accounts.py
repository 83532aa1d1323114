"""`mailingest accounts add|test|set|remove|list`: parse and print; accounts.py does the work."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from mailingest import accounts, logs
from mailingest.config import Config
from mailingest.errors import EX_OK, STATUS_EXIT, DataError, UsageError
from mailingest.output import print_table


def _oauth2_table(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.oauth2 is None:
        for key in ("grant", "client_id", "tenant", "token_url", "device_url", "auth_url"):
            if getattr(args, key):
                raise UsageError(f"--{key.replace('_', '-')} needs --oauth2 PROVIDER")
        if args.scope or args.mechanism:
            raise UsageError("--scope and --mechanism need --oauth2 PROVIDER")
        return None
    if args.password_stdin or args.password_env:
        raise UsageError("an OAuth2 account has no password; see --client-secret-env")
    table: dict[str, Any] = {"provider": args.oauth2}
    for key in ("grant", "client_id", "tenant", "token_url", "device_url", "auth_url"):
        if getattr(args, key) is not None:
            table[key] = getattr(args, key)
    if args.scope:
        table["scopes"] = list(args.scope)
    if args.mechanism is not None:
        table["mechanism"] = args.mechanism
    return table


def run(args: argparse.Namespace, load: Callable[[], Config]) -> int:
    config = load()
    action = args.accounts_command
    if action == "add":
        return _add(args, config)
    if action == "test":
        from mailingest import commands

        full = asyncio.run(accounts.effective_config(config))
        logs.register_secrets(full.secrets())
        results = asyncio.run(commands.check(full, [args.name]))
        return _report(args, results[0], STATUS_EXIT.get(results[0]["pop3"]["status"], 65))
    if action == "set":
        changes = _settings(args)
        if args.no_excluded_domains:
            changes["excluded_domains"] = None
        if args.no_aliases:
            changes["aliases"] = None
        if args.no_primary:
            changes["primary"] = None
        for key in ("host", "port", "username"):
            if getattr(args, key) is not None:
                changes[key] = getattr(args, key)
        passwords = accounts.NewPasswords(pop3=_password(args))
        if not changes and passwords.pop3 is None:
            raise UsageError("nothing to change; see `mailingest accounts set --help`")
        secret = bool(args.client_secret_stdin or args.client_secret_env)
        result = asyncio.run(
            accounts.change(
                config, args.name, changes, passwords, client_secret=secret, actor=_actor()
            )
        )
        return _report(args, result, EX_OK)
    if action == "remove":
        return _report(args, asyncio.run(accounts.remove(config, args.name)), EX_OK)
    rows = asyncio.run(accounts.listing(config))
    if args.json:
        sys.stdout.write(json.dumps({"accounts": rows}) + "\n")
    else:
        keys = ["account", "owner", "host", "username", "sharing", "source"]
        print_table(keys, [[r[k] for k in keys] for r in rows])
    return EX_OK


def _add(args: argparse.Namespace, config: Config) -> int:
    table: dict[str, Any] = {
        "name": args.name,
        "owner": args.owner,
        "host": args.host,
        "username": args.username,
        **_settings(args),
    }
    if args.port is not None:
        table["port"] = args.port
    if args.security is not None:
        table["security"] = args.security
    if args.allow_plaintext:
        table["allow_plaintext"] = True
    if args.delete:
        table["leave_on_server"] = False
    oauth2 = _oauth2_table(args)
    secret = _password(args)
    if oauth2 is not None:
        table["auth"] = {"oauth2": oauth2}
        secret = secret or ""  # a public client: no secret
    elif secret is None or args.client_secret_stdin or args.client_secret_env:
        raise UsageError("give --password-stdin or --password-env (or --oauth2 PROVIDER)")
    passwords = accounts.NewPasswords(pop3=secret)
    result = asyncio.run(
        accounts.add(config, table, passwords, test=not args.no_test, actor=_actor())
    )
    pop3 = result["pop3"]
    code = EX_OK if result["added"] else STATUS_EXIT.get(pop3["status"], 65)
    return _report(args, result, code)


def _actor() -> str:
    """Who changes an account, for the audit: ``cli:`` and the login name (``$SUDO_USER``
    behind sudo), as the API names its caller ``api:...``, whichever process applies it."""
    from mailingest.crm import current_actor

    return f"cli:{current_actor()}"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.sharing is not None:
        out["sharing"] = args.sharing
    if args.excluded_domain:
        out["excluded_domains"] = list(args.excluded_domain)
    if args.alias:
        out["aliases"] = list(args.alias)
    for key in ("magnet_label", "from_address", "poll_interval", "timeout", "max_message_size"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value or None  # "" removes the key
    if args.primary:
        out["primary"] = True
    if args.delete_after_days is not None:
        out["delete_after_days"] = args.delete_after_days
    return {k: v for k, v in out.items() if v is not None or k in ("magnet_label", "from_address")}


def _password(args: argparse.Namespace) -> str | None:
    """The password, or an OAuth2 client secret (stored alike: sealed)."""
    what = "client secret" if args.client_secret_stdin or args.client_secret_env else "password"
    if args.password_stdin or args.client_secret_stdin:
        line = sys.stdin.buffer.readline()
        try:
            text = line.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise DataError(f"the {what} on stdin is not valid UTF-8") from exc
        if not text:
            raise DataError(f"no {what} on stdin (one line expected)")
        return text
    variable = args.password_env or args.client_secret_env
    if variable:
        value = os.environ.get(variable)
        if not value:
            raise UsageError(f"environment variable {variable} is not set or empty")
        return value
    return None


def _report(args: argparse.Namespace, result: dict[str, Any], code: int) -> int:
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    elif "added" in result:
        pop3 = result["pop3"]
        if result["added"]:
            tested = f" (tested: {pop3['messages']} messages)" if pop3 else " (not tested)"
            sys.stdout.write(f"account {result['account']!r} added{tested}\n")
        else:
            sys.stdout.write(
                f"account {result['account']!r} not added: {pop3['status']}: {pop3['error']}\n"
            )
    elif "removed" in result:
        sys.stdout.write(f"account {result['account']!r} removed; its stored mail stays\n")
    elif "changed" in result:
        sys.stdout.write(f"account {result['account']!r}: {', '.join(result['changed'])}\n")
    else:
        pop3 = result["pop3"]
        sys.stdout.write(f"account {result['account']!r}: {pop3['status']} {pop3['error'] or ''}\n")
    return code

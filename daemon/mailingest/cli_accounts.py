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


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("accounts", help="accounts kept in the database: add, test, set, ...")
    asub = parser.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    p = asub.add_parser("add", help="test the account as `check` does, then store it")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--owner", required=True, metavar="USER", help="the CRM user")
    p.add_argument("--host", required=True)
    p.add_argument("--username", required=True, metavar="LOGIN")
    _password_options(p)
    _oauth2_options(p)
    p.add_argument("--port", type=int)
    p.add_argument("--security", choices=["tls", "starttls", "plain"])
    p.add_argument("--allow-plaintext", action="store_true", help="needed with --security plain")
    p.add_argument("--delete", action="store_true", help="delete from the server once stored")
    _settings_options(p)
    p.add_argument("--no-test", action="store_true", help="store without logging in first")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = asub.add_parser("test", help="connect, TLS, login, STAT (as `check --account NAME`)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = asub.add_parser("set", help="change a stored account's settings or password")
    p.add_argument("name", metavar="NAME")
    _password_options(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--username", metavar="LOGIN")
    _settings_options(p)
    p.add_argument("--no-excluded-domains", action="store_true", help="clear the list")
    p.add_argument("--no-aliases", action="store_true", help="clear the list")
    p.add_argument("--no-primary", action="store_true", help="no longer the owner's primary")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = asub.add_parser("remove", help="forget a stored account; its stored mail stays")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = asub.add_parser("list", help="every account, from the config file and the database")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _password_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    group.add_argument("--password-env", metavar="VAR", help="read it from this variable")
    group.add_argument(
        "--client-secret-stdin", action="store_true", help="OAuth2: the client secret, from stdin"
    )
    group.add_argument("--client-secret-env", metavar="VAR", help="OAuth2: the client secret")


def _oauth2_options(p: argparse.ArgumentParser) -> None:
    """OAuth2 sign-in instead of a password: the keys of auth = { oauth2 = ... }."""
    p.add_argument("--oauth2", choices=["microsoft", "google", "custom"], metavar="PROVIDER")
    p.add_argument("--grant", choices=["refresh_token", "client_credentials", "jwt_bearer"])
    p.add_argument("--client-id", metavar="ID")
    p.add_argument("--tenant", metavar="DIRECTORY", help="Microsoft")
    p.add_argument("--token-url", metavar="URL")
    p.add_argument("--device-url", metavar="URL", help="for `auth login` (device code)")
    p.add_argument("--auth-url", metavar="URL", help="for `auth login` (browser)")
    p.add_argument("--scope", action="append", metavar="SCOPE")
    p.add_argument("--mechanism", choices=["auto", "xoauth2", "oauthbearer"])


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


def _settings_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sharing", choices=["private", "custom", "public"])
    p.add_argument("--excluded-domain", action="append", metavar="DOMAIN", help="public mode")
    p.add_argument("--magnet-label", metavar="LABEL", help='"" removes it')
    p.add_argument("--from-address", metavar="ADDR", help='"" removes it')
    p.add_argument("--alias", action="append", metavar="ADDR", help="another From of the owner")
    p.add_argument("--primary", action="store_true", help="the owner's account for replies")
    p.add_argument("--delete-after-days", type=int, metavar="N")
    p.add_argument("--poll-interval", metavar="DURATION", help="e.g. 5m")
    p.add_argument("--timeout", metavar="DURATION", help="e.g. 60s")
    p.add_argument("--max-message-size", metavar="SIZE", help='e.g. 25MB; "0" for no limit')


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
            accounts.change(config, args.name, changes, passwords, client_secret=secret)
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
    result = asyncio.run(accounts.add(config, table, passwords, test=not args.no_test))
    pop3 = result["pop3"]
    code = EX_OK if result["added"] else STATUS_EXIT.get(pop3["status"], 65)
    return _report(args, result, code)


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

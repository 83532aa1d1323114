"""The command line's grammar. A command's parser is made only once the command is chosen:
argparse asks gettext (which searches the file system for a message catalog) for the
titles and help of every parser it makes, and making all of them cost every run of any one
command some 6 ms; the top-level help and the check of the command's name need only the
names and their help texts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from mailingest import __version__

#: Adds a command's arguments (and its actions' parsers) to its parser.
Build = Callable[[argparse.ArgumentParser], None]


def _columns() -> int:
    """``shutil.get_terminal_size().columns``, as argparse's formatter asks it, without
    importing shutil (and bz2 and lzma with it): every ``add_argument`` makes a formatter."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help is formatted by ``_Formatter`` (its subcommands' too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose parsers are made, and given their arguments, when chosen (to be
    parsed or to show their help). Until then a command is its name and help text, which
    is what argparse's choice check and the top-level help read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._builds: dict[str, Build | None] = {}

    def command(self, name: str, help: str, build: Build | None = None) -> None:
        """As ``add_parser(name, help=help)``, the parser itself made by ``__call__``."""
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        self._name_parser_map[name] = None
        self._builds[name] = build

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, list)
        name = values[0]
        if name in self._builds:
            chosen = self._parser_class(prog=f"{self._prog_prefix} {name}")
            build = self._builds.pop(name)
            if build is not None:
                build(chosen)
            self._name_parser_map[name] = chosen
        super().__call__(parser, namespace, values, option_string)


def parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    # prog given: argparse would format the usage to find it, importing shutil (bz2, lzma).
    sub = cast(
        _Commands,
        parser.add_subparsers(
            dest="command", required=True, metavar="COMMAND", action=_Commands, prog=parser.prog
        ),
    )
    sub.command("run", "the daemon (systemd Type=notify)")
    sub.command("fetch", "one cycle for each (selected) account, then exit", _accounts_json)
    sub.command("check", "connect, TLS, login, STAT; nothing fetched or changed", _accounts_json)
    sub.command("config", "validate and print the effective config, secrets redacted")
    sub.command("status", "per account: last poll, result, stored count", _json)
    sub.command("messages", "what a CRM user may see, newest first", _messages)
    sub.command("records", "CRM leads and contacts that mail links to", _records)
    sub.command("accounts", "accounts kept in the database: add, test, set, ...", _accounts)
    sub.command("release", "fetch a quarantined (oversized) message in full", _release)
    sub.command("explain", "why a viewer may see a message: the rule that decided", _explain)
    sub.command("audit", "changes of sharing modes, excluded domains, share flags", _audit)
    sub.command("auth", "OAuth2: sign an account in once (stores its refresh token)", _auth)
    sub.command("api", "the HTTP API served by `run` ([api] in the config)", _api)
    sub.command("show", "one message; --raw writes the exact stored bytes", _show)
    sub.command("send", "send from the CRM over SMTP; stored as outgoing, tagged", _send)
    sub.command("reply", "reply to a message you may see, from your primary account", _reply)
    sub.command("demo", "ingest sample mail from a loopback POP3 server; no mailbox needed", _demo)
    return parser


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _accounts_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account", action="append", metavar="NAME", help="only this account")
    _json(p)


def _messages(p: argparse.ArgumentParser) -> None:
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
    _json(p)


def _records(records: argparse.ArgumentParser) -> None:
    rsub = records.add_subparsers(dest="records_command", required=True, metavar="ACTION")
    p = rsub.add_parser("import", help="upsert records from a CSV (header id,kind,email,name)")
    p.add_argument("file", metavar="FILE.csv")
    p = rsub.add_parser("list", help="the records and their addresses")
    _json(p)
    p = rsub.add_parser("set-email", help="change a record's addresses (EMAIL[;EMAIL])")
    p.add_argument("id", metavar="ID")
    p.add_argument("emails", metavar="EMAIL[;EMAIL]")
    p = rsub.add_parser("create-from", help="a record for a message's sender; links its mail")
    p.add_argument("message", type=int, metavar="MESSAGE_ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--id", dest="record_id", metavar="ID", help="default: the sender's address")
    p.add_argument("--kind", choices=["lead", "contact"], default="lead")
    p.add_argument("--name", help="default: the From header's display name")
    _json(p)
    p = rsub.add_parser("share", help="custom mode: share USER's mail with this record")
    p.add_argument("id", metavar="ID")
    p.add_argument("--owner", required=True, metavar="USER")
    p.add_argument("--off", action="store_true", help="stop sharing")
    p.add_argument("--by", metavar="USER", help="who asks, for the audit log (default: you)")


def _accounts(parser: argparse.ArgumentParser) -> None:
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
    _json(p)
    p = asub.add_parser("test", help="connect, TLS, login, STAT (as `check --account NAME`)")
    p.add_argument("name", metavar="NAME")
    _json(p)
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
    _json(p)
    p = asub.add_parser("remove", help="forget a stored account; its stored mail stays")
    p.add_argument("name", metavar="NAME")
    _json(p)
    p = asub.add_parser("list", help="every account, from the config file and the database")
    _json(p)


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


def _release(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=int, metavar="ID")
    _json(p)


def _explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    _json(p)


def _audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--owner", metavar="USER")
    p.add_argument("--account", metavar="NAME")
    p.add_argument("--record", metavar="ID")
    p.add_argument("--limit", type=int, metavar="N", help="the N newest entries")
    _json(p)


def _auth(auth: argparse.ArgumentParser) -> None:
    asub = auth.add_subparsers(dest="auth_command", required=True, metavar="COMMAND")
    p = asub.add_parser(
        "login",
        help="device code (Microsoft) or browser sign-in (Google); app-only grants: test it",
    )
    p.add_argument("--account", required=True, metavar="NAME")
    p.add_argument("--smtp", action="store_true", help="the account's SMTP sign-in, not POP3")
    p.add_argument(
        "--flow", choices=("device", "browser"), help="default: what the provider offers"
    )
    _json(p)


def _api(api: argparse.ArgumentParser) -> None:
    asub = api.add_subparsers(dest="api_command", required=True, metavar="ACTION")
    token = asub.add_parser("token", help="bearer tokens: create, list, revoke")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    p = tsub.add_parser("create", help="a new token for a CRM user, printed once")
    p.add_argument("--user", required=True, metavar="NAME", help="who the token is")
    p.add_argument(
        "--admin", action="store_true", help="may change any owner's sharing, delete records"
    )
    p.add_argument(
        "--act-for",
        action="store_true",
        help="may act as any user with the X-Act-As header (the CRM's service token)",
    )
    p.add_argument("--label", default="", help="what it is for, shown by `list`")
    _json(p)
    p = tsub.add_parser("list", help="the tokens (never the tokens themselves)")
    _json(p)
    p = tsub.add_parser("revoke", help="a token stops working at once")
    p.add_argument("id", type=int, metavar="ID")
    _json(p)


def _show(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--raw", action="store_true", help="write the stored bytes to stdout")


def _send(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account", required=True, metavar="NAME")
    p.add_argument("--to", required=True, nargs="+", action="extend", metavar="ADDR")
    p.add_argument("--cc", nargs="+", action="extend", default=[], metavar="ADDR")
    p.add_argument("--subject", required=True, metavar="S")
    p.add_argument("--body-file", required=True, metavar="F", help="the body text; - for stdin")
    _json(p)


def _reply(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--viewer", required=True, metavar="USER")
    p.add_argument("--body-file", required=True, metavar="F", help="the body text; - for stdin")
    p.add_argument("--all", action="store_true", help="reply to all: the other recipients go in Cc")
    _json(p)


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database",
        metavar="URL",
        help="a postgresql:// database to use (empty; password from $PGPASSWORD) instead of "
        "a temporary SQLite file",
    )

"""Accounts: an owner's sharing settings (read, change), add with a test login, check now,
fetch now. GET /accounts (the status of the caller's accounts) is in ops.py.

A non-admin caller sees only the accounts it owns (its token's user, or the user it acts
for): another owner's account is 404, as an unknown name, so names do not leak. Only
accounts kept in the database change here (409 for the config file's: edit the file); the
daemon applies a change before the answer, re-tag included.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from mailingest import accounts, commands
from mailingest.api.errors import ApiError, json_object, known_keys, text
from mailingest.api.host import ApiHost, caller_of, host_of
from mailingest.config import Account, parse_duration
from mailingest.errors import ConfigError, DataError, UsageError
from mailingest.logs import get_logger
from mailingest.model import Status

log = get_logger("mailingest.api")

#: What PATCH changes: the owner's sharing settings of one account (null removes a key).
#: Test logins (add, check now) that requests may run at once, and the longest timeout one
#: may ask for: each holds one of the worker threads the polls use.
TEST_LOGINS = web.AppKey("test_logins", asyncio.Semaphore)
TEST_LOGINS_AT_ONCE = 2
TEST_TIMEOUT = 60.0

SETTINGS = ("sharing", "excluded_domains", "magnet_label", "from_address", "aliases", "primary")
#: What POST takes: the ``[[accounts]]`` keys a user may set (no files, no SMTP yet).
ADD_KEYS = (
    *"name owner host port security username password allow_plaintext leave_on_server".split(),
    *"delete_after_days poll_interval timeout max_message_size test".split(),
    *SETTINGS,
)
_TYPES: dict[str, tuple[type, ...]] = {
    "sharing": (str,),
    "excluded_domains": (list,),
    "magnet_label": (str,),
    "from_address": (str,),
    "aliases": (list,),
    "primary": (bool,),
}


#: What a failed test login tells a non-admin: its status and one of these, never the
#: server's own words (any user may point a test at any host and port).
_CAUSES = {
    Status.AUTH_FAILED: "the server rejected the login",
    Status.TLS_FAILED: "TLS failed (a handshake failure or a rejected certificate)",
    Status.UNAVAILABLE: "the server could not be reached (no such host, or connection refused)",
    Status.TEMP_FAILED: "the server timed out, dropped the connection or was busy",
    Status.ERROR: "the server did not answer as a POP3 server",
}


def _account(host: ApiHost, request: web.Request) -> Account:
    """The named account, if the caller may see it (else 404, as for an unknown name)."""
    name = request.match_info["name"]
    caller = caller_of(request)
    found = (a for a in host.config.accounts if a.name == name and caller.may_manage(a.owner))
    account = next(found, None)
    if account is None:
        raise ApiError(404, f"no account {name!r}")
    return account


async def get_settings(request: web.Request) -> web.Response:
    host = host_of(request)
    account = _account(host, request)
    from_file = any(a.name == account.name for a in host.file_config.accounts)
    return web.json_response(
        {
            "account": account.name,
            "owner": account.owner,
            "source": "config" if from_file else "database",
            "sharing": account.sharing,
            "excluded_domains": list(account.excluded_domains),
            "magnet_label": account.magnet_label,
            "from_address": account.from_address,
            "aliases": list(account.aliases),
            "primary": account.primary,
        }
    )


async def patch_settings(request: web.Request) -> web.Response:
    """`accounts set` for the sharing settings: `{"account", "changed": [...]}`."""
    host = host_of(request)
    account = _account(host, request)
    data = await json_object(request)
    known_keys(data, SETTINGS)
    if not data:
        raise ApiError(422, f"nothing to change; keys: {', '.join(SETTINGS)}", field="body")
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if value is not None and not isinstance(value, _TYPES[key]):
            raise ApiError(422, f"expected {_TYPES[key][0].__name__} or null", field=key)
        changes[key] = None if value is False else value  # primary: false removes it
    actor = caller_of(request).actor
    with host.changing(account.name, actor):
        try:
            result = await accounts.change(
                host.file_config,
                account.name,
                changes,
                accounts.NewPasswords(),
                store=host.store,
                actor=actor,
            )
        except UsageError as exc:  # an account of the config file
            raise ApiError(409, str(exc)) from None
        except DataError as exc:
            raise ApiError(422, str(exc), field=_named(exc, changes)) from None
        await host.accounts_changed()
    return web.json_response(result)


async def add_account(request: web.Request) -> web.Response:
    """ "Add account, test account, create": `accounts add`; nothing stored if the test
    login fails (422 naming `password` for a rejected login, else `host`).

    A non-admin adds accounts of its own user only, always tested, and learns of a failed
    test only its status and a fixed cause: the server's words go to the log (an admin
    gets them too, as `check` prints them)."""
    host, caller = host_of(request), caller_of(request)
    data = await json_object(request)
    known_keys(data, ADD_KEYS)
    table = {k: v for k, v in data.items() if k not in ("password", "test")}
    owner = text(data, "owner")
    text(data, "name")
    password = text(data, "password")
    test = data.get("test", True)
    if not isinstance(test, bool):
        raise ApiError(422, "expected true or false", field="test")
    if not caller.may_manage(owner):
        raise ApiError(403, f"only {owner!r} (or an admin) adds {owner!r}'s accounts")
    if not test and not caller.admin:
        raise ApiError(403, "only an admin adds an account without its test login")
    _bounded_timeout(table)
    try:
        async with request.app[TEST_LOGINS]:
            result = await accounts.add(
                host.file_config,
                table,
                accounts.NewPasswords(pop3=password),
                test=test,
                store=host.store,
                actor=caller.actor,
            )
    except UsageError as exc:  # the name is taken
        raise ApiError(409, str(exc)) from None
    except DataError as exc:
        raise ApiError(422, str(exc), field=_named(exc, table)) from None
    if not result["added"]:
        pop3 = result["pop3"]
        status = Status(pop3["status"])
        log.info(
            "api_test_login_failed", account=result["account"], status=status, error=pop3["error"]
        )
        cause = pop3["error"] if caller.admin else _CAUSES.get(status, "the login failed")
        field = "password" if status == Status.AUTH_FAILED else "host"
        raise ApiError(422, f"the test login failed ({status}): {cause}", field=field)
    await host.accounts_changed()
    return web.json_response(result)


async def check(request: web.Request) -> web.Response:
    """`check --json`'s entry for one account: log in, STAT, nothing changed."""
    host = host_of(request)
    account = _account(host, request)
    async with request.app[TEST_LOGINS]:
        return web.json_response(await commands.check_one(account, host.store))


async def fetch_now(request: web.Request) -> web.Response:
    """Poll the account at once; 202: requested (GET /accounts shows the result)."""
    host = host_of(request)
    account = _account(host, request)
    started = host.poll_now(account.name)
    if started is None:  # added a moment ago: its runner is not scheduled yet
        raise ApiError(409, f"account {account.name!r} is not scheduled yet; try again")
    if not started:
        fix = "sign in again (auth login)" if account.auth is not None else "change its password"
        raise ApiError(409, f"account {account.name!r} is paused: its login was rejected; {fix}")
    return web.json_response({"account": account.name, "poll": "requested"}, status=202)


def _bounded_timeout(table: dict[str, Any]) -> None:
    """A test login started by a request holds a worker thread the polls need: at most
    TEST_TIMEOUT each (a silent server), and TEST_LOGINS_AT_ONCE at a time."""
    raw = table.get("timeout")
    if raw is None:  # the default, 60 s
        return
    try:
        seconds = parse_duration(raw, key_path="timeout")
    except ConfigError as exc:
        raise ApiError(422, str(exc), field="timeout") from None
    if seconds > TEST_TIMEOUT:
        raise ApiError(422, f"at most {TEST_TIMEOUT:.0f} seconds", field="timeout")


def _named(exc: Exception, keys: dict[str, Any]) -> str | None:
    """The key a validation error is about, when the message names one of ``keys``."""
    return next((k for k in keys if f"{k}:" in str(exc) or f".{k}" in str(exc)), None)

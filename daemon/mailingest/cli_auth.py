"""`mailingest auth login`: parse and print; the sign-in itself is in authlogin.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable

from mailingest import commands
from mailingest.config import Config
from mailingest.errors import EX_OK, UsageError


def run(args: argparse.Namespace, load: Callable[[], Config]) -> int:
    from mailingest import authlogin

    config = load()
    [account] = commands.select_accounts(config, [args.account])
    service = "smtp" if args.smtp else "pop3"
    if args.smtp and account.smtp is None:
        raise UsageError(f"account {account.name!r} has no [accounts.smtp]")
    conf = account.smtp.auth if args.smtp and account.smtp else account.auth
    identity = account.smtp.username.lower() if args.smtp and account.smtp else account.identity
    if conf is None:
        where = "[accounts.smtp] of " if args.smtp else ""
        raise UsageError(f"{where}account {account.name!r} does not sign in with OAuth2 (auth)")

    def say(text: str) -> None:
        # On stderr with --json, so stdout stays one JSON document.
        stream = sys.stderr if args.json else sys.stdout
        stream.write(text + "\n")
        stream.flush()

    async def sign_in() -> authlogin.SignedIn:
        async with commands.open_store(config) as store:
            if conf.grant != "refresh_token":  # no user step: a token and a login prove it
                return await authlogin.confirm(account, service, conf, store)
            return await authlogin.login(
                account.name, service, conf, store, say, identity=identity, flow=args.flow
            )

    done = asyncio.run(sign_in())
    if args.json:
        shape = {"account": done.account, "service": done.service, "flow": done.flow}
        sys.stdout.write(json.dumps({**shape, "scopes": list(done.scopes)}) + "\n")
    elif done.flow in ("device", "browser"):
        sys.stdout.write(
            f"account {done.account!r} signed in ({done.service}, {done.flow} flow); "
            "refresh token stored sealed; the daemon uses it from its next poll\n"
        )
    else:
        sys.stdout.write(
            f"account {done.account!r} signs in ({done.service}, {done.flow} grant): a token "
            "was granted and the login accepted; a pause on it has ended\n"
        )
    return EX_OK

"""`mailingest api token create|list|revoke`: the HTTP API's bearer tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from mailingest import commands
from mailingest.api.tokens import USER_RE, new_token, token_hash
from mailingest.config import Config
from mailingest.errors import EX_OK, DataError, UsageError
from mailingest.output import print_table


def run(args: argparse.Namespace, load: Callable[[], Config]) -> int:
    action = args.token_command
    if action == "create" and not USER_RE.fullmatch(args.user):
        raise DataError(f"--user {args.user!r}: letters, digits and . _ @ - only")
    config = load()
    out: dict[str, Any] = asyncio.run(_ACTIONS[action](config, args))
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
    elif action == "create":
        rights = [r for r in ("admin", "act_for") if out[r]]
        sys.stdout.write(out["token"] + "\n")
        sys.stderr.write(
            f"token {out['id']} for {out['user']}"
            f"{' (' + ', '.join(rights) + ')' if rights else ''}: shown this once; keep it "
            "secret (only its hash is stored)\n"
        )
    elif action == "list":
        print_table(
            ["id", "user", "admin", "act_for", "label", "created"],
            [
                [t["id"], t["user"], t["admin"], t["act_for"], t["label"], t["created_at"]]
                for t in out["tokens"]
            ],
        )
    else:
        sys.stdout.write(f"token {out['id']} revoked\n")
    return EX_OK


async def _create(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    token = new_token()
    async with commands.open_store(config) as store:
        made = await store.add_api_token(
            args.user, token_hash(token), admin=args.admin, act_for=args.act_for, label=args.label
        )
    return {**made.to_json(), "token": token}


async def _list(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    async with commands.open_store(config) as store:
        return {"tokens": [t.to_json() for t in await store.api_tokens()]}


async def _revoke(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    async with commands.open_store(config) as store:
        if not await store.revoke_api_token(args.id):
            raise UsageError(f"no token {args.id}; see `mailingest api token list`")
    return {"id": args.id, "revoked": True}


_ACTIONS = {"create": _create, "list": _list, "revoke": _revoke}

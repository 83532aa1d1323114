"""`mailingest release`, `explain` and `audit`: parse and print; the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from mailingest import commands
from mailingest.config import Config
from mailingest.errors import EX_OK, DataError
from mailingest.output import human_bytes


def add_parser(sub: Any) -> None:
    p = sub.add_parser("release", help="fetch a quarantined (oversized) message in full")
    p.add_argument("id", type=int, metavar="ID")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def release(args: argparse.Namespace, load: Callable[[], Config]) -> int:
    from mailingest.release import release as fetch_whole

    config = load()

    async def run() -> Any:
        async with commands.open_store(config) as store:
            message = await store.message(args.id)
            if message is None:
                raise DataError(f"message {args.id} does not exist")
            [account] = commands.select_accounts(config, [message.account])
            return await fetch_whole(account, store, args.id)

    done = asyncio.run(run())
    if args.json:
        sys.stdout.write(json.dumps(done.to_json()) + "\n")
    else:
        where = "; deleted from the server" if done.deleted else ""
        sys.stdout.write(f"message {done.id} released: {human_bytes(done.size)} stored{where}\n")
    return EX_OK

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
from mailingest.errors import EX_OK, DataError, UsageError
from mailingest.model import AuditEntry
from mailingest.output import human_bytes, print_table


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


def unmatched(args: argparse.Namespace, config: Config) -> int:
    from mailingest import review

    if args.record or args.label or args.quarantined:
        raise UsageError("--unmatched lists mail linked to no record: no --record/--label")
    groups = asyncio.run(review.unmatched(config, args.viewer))
    if args.json:
        sys.stdout.write(json.dumps([g.to_json() for g in groups]) + "\n")
    else:
        print_table(
            ["sender", "messages", "latest", "last id"],
            [[g.sender, g.count, g.latest[:16], g.last_message] for g in groups],
        )
    return EX_OK


def create_from(args: argparse.Namespace, config: Config) -> int:
    from mailingest import review

    done = asyncio.run(
        review.create_from(
            config,
            args.message,
            args.viewer,
            record_id=args.record_id,
            kind=args.kind,
            name=args.name,
        )
    )
    if args.json:
        sys.stdout.write(json.dumps(done.to_json(), ensure_ascii=False) + "\n")
    else:
        r = done.record
        sys.stdout.write(
            f"{r.kind} {r.id!r} ({r.name or 'no name'}, {r.emails[0]}): "
            f"{done.linked} stored message(s) linked\n"
        )
    return EX_OK


def explain(args: argparse.Namespace, config: Config) -> int:
    from mailingest import review

    found = asyncio.run(review.explain(config, args.id, args.viewer))
    if args.json:
        sys.stdout.write(json.dumps(found.to_json(), ensure_ascii=False) + "\n")
        return EX_OK
    m = found.message
    lines = [
        f"message {m.id} ({m.account}, owner {m.owner}): {m.visibility} ({m.reason})",
        f"{args.viewer} may see it: {found.why_visible}",
        f"rule: {found.rule}",
    ]
    for entry in found.history:
        lines.append(f"  {entry.at}  {entry.actor}: {_change(entry)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return EX_OK


def audit(args: argparse.Namespace, config: Config) -> int:
    from mailingest import review

    entries = asyncio.run(
        review.audit(
            config, owner=args.owner, account=args.account, record=args.record, limit=args.limit
        )
    )
    if args.json:
        sys.stdout.write(json.dumps([e.to_json() for e in entries], ensure_ascii=False) + "\n")
    else:
        print_table(
            ["at", "who", "change", "re-tagged"],
            [[e.at[:19], e.actor, _change(e), e.retagged] for e in entries],
        )
    return EX_OK


def _change(entry: AuditEntry) -> str:
    if entry.action in ("share", "unshare"):
        return f"{entry.action} {entry.owner}'s mail with record {entry.record}"
    changes = "; ".join(
        f"{key} {_shown(v.get('from'))} -> {_shown(v.get('to'))}" for key, v in entry.detail.items()
    )
    return f"account {entry.account}: {changes}"


def _shown(value: object) -> str:
    return ",".join(map(str, value)) or "(none)" if isinstance(value, list) else str(value)

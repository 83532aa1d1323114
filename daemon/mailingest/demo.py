"""`mailingest demo`: the real config loader, fetch cycle and store against sample mail.

No mailbox needed: a loopback POP3 server serves the bundled sample mailboxes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TextIO

from mailingest import commands
from mailingest.config import load_config
from mailingest.errors import EX_OK, STATUS_EXIT, worst_exit
from mailingest.logs import get_logger
from mailingest.output import human_bytes, print_table
from mailingest.popserver import LoopbackPop3Server
from mailingest.samples import sample_mailboxes, sample_records_csv

log = get_logger("mailingest.demo")

_ACCOUNTS = (
    # (account name, CRM owner, login name, password, extra settings)
    ("alice-mail", "alice", "alice", "demo-alice", 'sharing = "custom"\nmagnet_label = "CRM"\n'),
    ("bob-mail", "bob", "bob", "demo-bob", 'sharing = "public"\n'),
    ("dana-gmail", "dana", "recent:dana@example.com", "demo-dana", ""),
)
#: alice shares her mail with this record (custom mode).
_SHARED_RECORD = "C1"


def demo_config_text(port: int, database: str = "demo.db") -> str:
    """A config like an operator would write, pointing at the loopback server."""
    parts = [f"[storage]\ndatabase = {json.dumps(database)}\n\n[daemon]\nmax_concurrent = 4\n"]
    for name, owner, user, password, extra in _ACCOUNTS:
        parts.append(
            f'\n[[accounts]]\nname = "{name}"\nowner = "{owner}"\nhost = "127.0.0.1"\n'
            f'port = {port}\nsecurity = "plain"\nallow_plaintext = true\n'
            f'username = "{user}"\npassword = "{password}"\nleave_on_server = true\n{extra}'
        )
    return "".join(parts)


async def run_demo(out: TextIO, *, database: str | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="mailingest-demo-") as tmp:
        async with LoopbackPop3Server(sample_mailboxes()) as server:
            log.info("demo_server_started", port=server.port)
            path = Path(tmp) / "mailingest.toml"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(demo_config_text(server.port, database or "demo.db"))
            config = load_config(path)
            out.write(f"mailingest demo: sample mailboxes on 127.0.0.1:{server.port}\n")
            count = await commands.records_import(config, sample_records_csv(), "sample records")
            await commands.records_share(config, _SHARED_RECORD, "alice", True)
            out.write(
                f"{count} CRM records imported; alice shares her mail with {_SHARED_RECORD}.\n"
                "Sharing: alice custom, bob public, dana private (the default).\n\n"
            )
            first = await commands.fetch(config, None)
            second = await commands.fetch(config, None)
        out.write("First fetch (every message stored byte-exact, committed before QUIT):\n")
        print_table(
            ["account", "status", "new", "bytes", "deleted"],
            [[r.account, r.status, r.new, human_bytes(r.bytes), r.deleted] for r in first],
            out,
        )
        out.write(
            f"\nSecond fetch: {sum(r.new for r in second)} new "
            "(the UIDL ledger and content hashes dedup; mail stays on the server)\n"
        )
        for _, owner, _, _, _ in _ACCOUNTS:
            seen = await commands.messages(config, owner)
            out.write(f"\nWhat {owner} sees ({len(seen)} messages):\n")
            print_table(
                ["id", "owner", "dir", "from", "subject", "records", "visibility"],
                [
                    [
                        m.id,
                        m.owner,
                        m.direction,
                        m.sender or "",
                        (m.subject or "")[:36],
                        ",".join(m.records),
                        f"{m.visibility} ({m.reason})",
                    ]
                    for m in seen
                ],
                out,
            )
        code = worst_exit([STATUS_EXIT[r.status] for r in (*first, *second)])
        if code != EX_OK:
            out.write("\ndemo: a fetch failed; see the status column\n")
        return code

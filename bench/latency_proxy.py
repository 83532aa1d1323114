"""TCP proxy for the bench: adds a one-way delay in each direction, optionally gates DELE.

usage: python latency_proxy.py LISTEN_PORT TARGET_PORT ONE_WAY_MS [--gate GATE.json]

Delay: every chunk read from one side is written to the other ONE_WAY_MS later (a 20 ms
round trip is 10 ms each way); order is kept, bandwidth is not limited. Prints ``ready``
on stdout once listening.

Gate (case P5): GATE.json names a SQLite store, an account, the server's message numbers
with their UIDLs, and the sha256 each message must be stored with. Every ``DELE n`` the
client sends is held until the proxy has looked in the store, through a connection of its
own, for a committed ledger row of that UIDL whose message has the expected hash; the
verdict is appended to the gate's log, then the DELE goes on. Meanwhile the proxy polls
the ledger and logs each change of its row count (the commits, as another process sees
them).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

_READ = 65536


class Gate:
    """Checks each DELE against the store's committed state; logs JSON lines."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.db_path = Path(spec["database"])
        self.account: str = spec["account"]
        self.uidl_of: dict[int, str] = {int(k): v for k, v in spec["uidls"].items()}
        self.sha_of: dict[str, str] = spec["sha256"]
        self.log: TextIO = Path(spec["log"]).open("a", buffering=1)
        self.started = time.monotonic()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None and self.db_path.exists():
            self._db = sqlite3.connect(self.db_path, timeout=10)
        return self._db

    def _emit(self, **event: Any) -> None:
        event["t"] = round(time.monotonic() - self.started, 6)
        self.log.write(json.dumps(event) + "\n")

    def _stored_sha(self, uidl: str) -> str | None:
        db = self._conn()
        if db is None:
            return None
        try:
            row = db.execute(
                "SELECT m.sha256 FROM ledger l JOIN messages m ON m.id = l.message"
                " WHERE l.account = ? AND l.uidl = ?",
                (self.account, uidl),
            ).fetchone()
        except sqlite3.OperationalError:  # schema not created yet
            return None
        return None if row is None else str(row[0])

    def check_dele(self, line: bytes) -> None:
        parts = line.split()
        num = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
        uidl = self.uidl_of.get(num)
        stored = self._stored_sha(uidl) if uidl is not None else None
        ok = uidl is not None and stored == self.sha_of.get(uidl)
        self._emit(event="dele", num=num, uidl=uidl, committed=stored is not None, ok=ok)

    async def watch_commits(self) -> None:
        last = -1
        while True:
            db = self._conn()
            count = -1
            if db is not None:
                try:
                    count = db.execute(
                        "SELECT count(*) FROM ledger WHERE account = ?", (self.account,)
                    ).fetchone()[0]
                except sqlite3.OperationalError:
                    count = -1
            if count != last and count >= 0:
                self._emit(event="ledger_rows", count=count)
                last = count
            await asyncio.sleep(0.002)


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    gate: Gate | None,
) -> None:
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    pending = b""
    try:
        while data := await reader.read(_READ):
            if gate is not None:
                # Client commands: forward whole lines, each DELE only after its check.
                pending += data
                *lines, pending = pending.split(b"\n")
                data = b""
                for line in lines:
                    if line[:4].upper() == b"DELE":
                        gate.check_dele(line)
                    data += line + b"\n"
                if not data:
                    continue
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, None))
    try:
        await task
    except ConnectionError:
        pass


async def _serve(listen: int, target: int, delay: float, gate: Gate | None) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pump(client_r, server_w, delay, gate),
            _pump(server_r, client_w, delay, None),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=512)
    watcher = asyncio.create_task(gate.watch_commits()) if gate is not None else None
    print("ready", flush=True)
    async with server:
        try:
            await server.serve_forever()
        finally:
            if watcher is not None:
                watcher.cancel()


def main(argv: list[str]) -> None:
    listen, target, one_way_ms = int(argv[0]), int(argv[1]), float(argv[2])
    gate = None
    if len(argv) > 4 and argv[3] == "--gate":
        gate = Gate(json.loads(Path(argv[4]).read_text()))
    asyncio.run(_serve(listen, target, one_way_ms / 1000, gate))


if __name__ == "__main__":
    main(sys.argv[1:])

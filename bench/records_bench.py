"""Records and sharing at scale: viewer query time and a whole-account re-tag (issue 4).

Builds a store with N messages (default 1,000,000, two accounts of N/2) and R CRM records
(default 100,000), then measures

* ``messages --viewer U --record R --limit 50 --json``: the query in-process
  (``Store.messages``) and the whole CLI process, for a typical and a very busy record, as
  the account's owner and as another user;
* a mode change of one account (private -> public) re-tagging all of its N/2 messages
  (``crm.sync_settings``, what every CLI start and the daemon's reload run), in-process and
  as part of a CLI start;
* the query plans of the statements the store issued (``EXPLAIN QUERY PLAN``).

The schema comes from ``Store.open`` (the real migrations); the synthetic rows are written
here with the sqlite3 module, as ``fetch`` would have left them (no raw chunks: neither
measured path reads them). Usage::

    python bench/records_bench.py [--messages N] [--records R] [--db PATH] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailingest import crm
from mailingest.config import Account, Config, DaemonSettings, Secret, StorageSettings
from mailingest.store import Store

BASE = datetime(2025, 1, 1, tzinfo=UTC)
OWNERS = {"bench-a": ("alice", "alice@own.example"), "bench-b": ("bob", "bob@own.example")}
BIG_RECORD = "R000000"  # gets 1 % of all mail: a customer with a very long history
LINKED_SHARE = 0.8  # the rest is unmatched (newsletters, strangers)
BATCH = 50_000


def account(name: str, sharing: str) -> Account:
    owner, identity = OWNERS[name]
    return Account(
        name=name,
        owner=owner,
        host="127.0.0.1",
        port=110,
        security="plain",
        username=identity,
        password=Secret("literal", "", "bench-not-used"),
        allow_plaintext=True,
        sharing=sharing,
    )


def config_of(db: Path, modes: dict[str, str]) -> Config:
    return Config(
        path=db.parent / "mailingest.toml",
        storage=StorageSettings(database=db),
        daemon=DaemonSettings(),
        accounts=tuple(account(name, mode) for name, mode in modes.items()),
    )


def write_config_file(db: Path, modes: dict[str, str]) -> Path:
    """The same config as TOML, for the CLI runs."""
    parts = [f'[storage]\ndatabase = "{db.name}"\n']
    for name, mode in modes.items():
        owner, identity = OWNERS[name]
        parts.append(
            f'\n[[accounts]]\nname = "{name}"\nowner = "{owner}"\nhost = "127.0.0.1"\n'
            f'port = 110\nsecurity = "plain"\nallow_plaintext = true\nusername = "{identity}"\n'
            f'password = "bench-not-used"\nsharing = "{mode}"\n'
        )
    path = db.parent / "mailingest.toml"
    path.write_text("".join(parts), encoding="utf-8")
    path.chmod(0o600)
    return path


def record_email(i: int) -> str:
    return f"r{i}@d{i % 5000}.example"


def _tag(sharing: str, linked: bool) -> tuple[str, str]:
    """Initial tags of synthetic mail; only the two modes the build uses."""
    if not linked:
        return "private", "unmatched"
    return ("shared", "public") if sharing == "public" else ("private", "mode_private")


def _message_rows(
    n: int, records: int, modes: dict[str, str], rng: random.Random
) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]], str | None]]:
    """(messages row, message_addresses rows, linked record or None) for ids 1..n."""
    names = list(modes)
    for i in range(1, n + 1):
        name = names[i % len(names)]
        owner, identity = OWNERS[name]
        roll = rng.random()
        if roll < 0.01:
            record: str | None = BIG_RECORD
            sender = record_email(0)
        elif roll < LINKED_SHARE:
            r = rng.randrange(1, records)
            record, sender = f"R{r:06d}", record_email(r)
        else:
            record, sender = None, f"u{i}@unknown{i % 100}.example"
        visibility, reason = _tag(modes[name], record is not None)
        date = (BASE + timedelta(seconds=30 * i)).isoformat()
        row = (
            i,
            name,
            owner,
            "in",
            2000 + i % 5000,
            f"{i:064x}",
            sender,
            json.dumps([identity]),
            "[]",
            f"message {i}",
            date,
            f"<m{i}@bench.example>",
            visibility,
            reason,
            date,
            "pop3",
        )
        addresses = [(i, "from", sender), (i, "to", identity)]
        yield row, addresses, record


def build(db: Path, n: int, records: int, modes: dict[str, str], seed: int) -> None:
    asyncio.run(_create_schema(db))
    rng = random.Random(seed)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA synchronous = OFF")
    con.execute("BEGIN")
    con.executemany(
        "INSERT INTO records (id, kind, name) VALUES (?,?,?)",
        ((f"R{i:06d}", "lead" if i % 3 else "contact", f"Record {i}") for i in range(records)),
    )
    con.executemany(
        "INSERT INTO record_emails (record, email) VALUES (?,?)",
        ((f"R{i:06d}", record_email(i)) for i in range(records)),
    )
    messages, addresses, links = [], [], []
    for row, addrs, record in _message_rows(n, records, modes, rng):
        messages.append(row)
        addresses += addrs
        if record is not None:
            links.append((row[0], record))
        if len(messages) >= BATCH:
            _flush(con, messages, addresses, links)
    _flush(con, messages, addresses, links)
    # The settings snapshot the store keeps, so the first CLI start re-tags nothing.
    for acct in config_of(db, modes).accounts:
        con.execute(
            "INSERT INTO account_settings (account, snapshot, magnet_label) VALUES (?,?,?)",
            (acct.name, crm.settings_snapshot(acct), None),
        )
    con.execute("COMMIT")
    con.close()


def _flush(
    con: sqlite3.Connection, messages: list[Any], addresses: list[Any], links: list[Any]
) -> None:
    con.executemany(
        "INSERT INTO messages (id, account, owner, direction, size, sha256, from_addr, to_addrs,"
        " cc_addrs, subject, date, message_id, visibility, reason, received_at, origin)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        messages,
    )
    con.executemany(
        "INSERT INTO message_addresses (message, role, address) VALUES (?,?,?)", addresses
    )
    con.executemany("INSERT INTO message_records (message, record) VALUES (?,?)", links)
    messages.clear()
    addresses.clear()
    links.clear()


async def _create_schema(db: Path) -> None:
    store = await Store.open(db)
    await store.close()


def typical_record(db: Path, records: int) -> tuple[str, int]:
    """A record with about the median amount of mail (among 200 from the middle)."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT record, count(*) FROM message_records WHERE record BETWEEN ? AND ?"
            " GROUP BY record ORDER BY count(*)",
            (f"R{records // 2:06d}", f"R{records // 2 + 200:06d}"),
        ).fetchall()
    finally:
        con.close()
    record, count = rows[len(rows) // 2]
    return str(record), int(count)


async def time_queries(db: Path, cases: list[tuple[str, str]], repeat: int) -> dict[str, Any]:
    """Median/max of Store.messages(viewer, record=..., limit=50), first call apart."""
    store = await Store.open(db)
    statements: list[str] = []
    out: dict[str, Any] = {}
    try:
        for viewer, record in cases:
            t0 = time.perf_counter()
            first = await store.messages(viewer, record=record, limit=50)
            cold = time.perf_counter() - t0
            runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                await store.messages(viewer, record=record, limit=50)
                runs.append(time.perf_counter() - t0)
            out[f"{viewer}/{record}"] = {
                "rows": len(first),
                "first_ms": round(cold * 1000, 2),
                "median_ms": round(statistics.median(runs) * 1000, 2),
                "max_ms": round(max(runs) * 1000, 2),
            }
        # The statements the store issues for one call, for EXPLAIN QUERY PLAN.
        await store._db._db.set_trace_callback(statements.append)  # type: ignore[attr-defined]  # bench only: peek at the SQL
        await store.messages(cases[0][0], record=cases[0][1], limit=50)
    finally:
        await store.close()
    out["statements"] = statements
    return out


async def time_unfiltered(db: Path) -> dict[str, float]:
    """``messages --viewer U --limit 50`` without --record (not a target of the issue)."""
    store = await Store.open(db)
    out = {}
    try:
        for viewer in ("carol", "alice"):
            t0 = time.perf_counter()
            await store.messages(viewer, limit=50)
            out[f"{viewer}_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    finally:
        await store.close()
    return out


async def time_import(db: Path, records: int, modes: dict[str, str]) -> dict[str, Any]:
    """Re-import every record with a second address (upsert, relink, re-tag): one transaction."""
    lines = ["id,kind,email,name"]
    lines += [
        f"R{i:06d},lead,{record_email(i)};alt{i}@d{i % 5000}.example,Record {i}"
        for i in range(records)
    ]
    config = config_of(db, modes)
    store = await Store.open(db)
    try:
        t0 = time.perf_counter()
        parsed = crm.parse_records_csv("\n".join(lines) + "\n", "bench.csv")
        count = await store.import_records(parsed, crm.policies(config))
        elapsed = time.perf_counter() - t0
    finally:
        await store.close()
    return {"records": count, "seconds": round(elapsed, 1)}


def explain(db: Path, statements: list[str]) -> list[str]:
    """Query plans of the distinct statement shapes (the first of each)."""
    con = sqlite3.connect(db)
    seen: set[str] = set()
    lines: list[str] = []
    try:
        for sql in statements:
            shape = sql.split(" WHERE ")[0]
            if shape in seen or not sql.lstrip().upper().startswith("SELECT"):
                continue
            seen.add(shape)
            lines.append(sql)
            for row in con.execute("EXPLAIN QUERY PLAN " + sql):
                lines.append(f"    {row[3]}")
    finally:
        con.close()
    return lines


def time_cli(config: Path, args: list[str], repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "mailingest", "-c", str(config), *args],
            capture_output=True,
            check=False,
        )
        runs.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"CLI failed ({proc.returncode}): {proc.stderr.decode()}")
    return {
        "median_ms": round(statistics.median(runs) * 1000, 1),
        "max_ms": round(max(runs) * 1000, 1),
    }


async def time_retag(db: Path, modes: dict[str, str]) -> dict[str, Any]:
    store = await Store.open(db)
    try:
        t0 = time.perf_counter()
        changed = await crm.sync_settings(store, config_of(db, modes))
        elapsed = time.perf_counter() - t0
    finally:
        await store.close()
    return {"accounts": changed, "seconds": round(elapsed, 2)}


def counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        return {
            f"{a}/{v}/{r}": int(c)
            for a, v, r, c in con.execute(
                "SELECT account, visibility, reason, count(*) FROM messages"
                " GROUP BY account, visibility, reason"
            )
        }
    finally:
        con.close()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs{mem}; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20, help="warm runs per query case")
    parser.add_argument("--db", type=Path, help="build here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="--db already built: skip the build")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--with-import", action="store_true", help="also time re-importing every record"
    )
    args = parser.parse_args()

    tmp = None if args.db else tempfile.mkdtemp(prefix="mailingest-records-bench-")
    db = args.db.resolve() if args.db else Path(tmp or ".") / "mail.db"
    start_modes = {"bench-a": "private", "bench-b": "public"}
    report: dict[str, Any] = {
        "machine": machine(),
        "messages": args.messages,
        "records": args.records,
    }
    try:
        if not args.reuse:
            t0 = time.perf_counter()
            build(db, args.messages, args.records, start_modes, seed=4)
            report["build_s"] = round(time.perf_counter() - t0, 1)
        report["db_mb"] = round(db.stat().st_size / 1e6)
        typical, typical_count = typical_record(db, args.records)
        report["typical_record"] = {"id": typical, "messages": typical_count}
        cases = [
            ("carol", typical),
            ("alice", typical),
            ("carol", BIG_RECORD),
            ("alice", BIG_RECORD),
        ]
        queries = asyncio.run(time_queries(db, cases, args.repeat))
        report["plans"] = explain(db, queries.pop("statements"))
        report["query_before_retag"] = queries
        report["query_without_record"] = asyncio.run(time_unfiltered(db))

        config = write_config_file(db, start_modes)
        query_args = [
            "messages",
            "--viewer",
            "carol",
            "--record",
            typical,
            "--limit",
            "50",
            "--json",
        ]
        report["cli_version_only"] = time_cli(config, ["--version"], 5)
        report["cli_messages"] = time_cli(config, query_args, 5)
        report["cli_messages_big_record"] = time_cli(
            config,
            ["messages", "--viewer", "carol", "--record", BIG_RECORD, "--limit", "50", "--json"],
            5,
        )

        # Mode change of bench-a (500,000 messages at the default size): private -> public.
        public = {"bench-a": "public", "bench-b": "public"}
        report["retag_private_to_public"] = asyncio.run(time_retag(db, public))
        report["tags_after_retag"] = counts(db)
        report["query_after_retag"] = asyncio.run(time_queries(db, cases, args.repeat))
        report["query_after_retag"].pop("statements")
        # The same kind of change as a user makes it: edit the config, run any command.
        custom = {"bench-a": "custom", "bench-b": "public"}
        config = write_config_file(db, custom)
        report["cli_start_with_retag_public_to_custom"] = time_cli(config, query_args, 1)
        if args.with_import:
            report["import_all_records"] = asyncio.run(time_import(db, args.records, custom))
    finally:
        if tmp and not args.keep:
            for path in Path(tmp).iterdir():
                path.unlink()
            os.rmdir(tmp)
        elif tmp:
            report["kept"] = tmp
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

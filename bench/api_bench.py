"""The HTTP API under load: `GET /messages?record=ID` at a million stored messages.

usage: python bench/api_bench.py [--messages 1000000] [--records 1000] [--clients 50]
                                 [--seconds 30] [--think MS [--stagger]] [--dir DIR]
                                 [--processes N] [--postgresql] [--json FILE]

Builds a store of ``--messages`` messages (SQLite, the default backend) linked to
``--records`` CRM records, half of them shared, owned by alice; starts `mailingest run`
with `[api]` and no accounts; then wrk (Debian's `wrk`) sends ``--clients`` concurrent
requests for ``--seconds``, each for the first page (50) of a random record's messages, as
bob (who sees the shared half). It reports wrk's latency percentiles and the request rate.
Target (issue 16): p99 < 20 ms on this 2-core machine, wrk and the daemon sharing it.
``--processes`` sets ``[api] processes`` (the daemon and its helper processes; the bench
waits until every helper listens, as wrk's connections are spread when they connect).

The messages are written straight into the schema the store created (a bench may do what
the package must not: SQL outside the store), as one transaction: a million messages
through a POP3 fetch would take the better part of an hour. ``--dir`` keeps the store for
the next run (built once). ``--postgresql`` stores on a private PostgreSQL cluster (fsync
on, started and removed by the bench, as bench/fleet.py does; built anew each run, as root).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from postgres import Postgres, private_postgres  # noqa: E402

PYTHON = sys.executable
SCRIPT = """
math.randomseed(os.time())
local delays = 0
request = function()
  local path = "/messages?limit=50&record=R" .. math.random(0, {records} - 1)
  return wrk.format("GET", path)
end
delay = function()
  delays = delays + 1
  if {stagger} and delays <= {clients} then
    return math.random(0, {think})
  end
  return {think}
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "mailingest", "-c", str(config), *args],
        capture_output=True,
        check=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout.decode()


#: The rows the bench writes, as (table, columns, rows of one batch).
_DATE = "2026-12-06T10:00:00+00:00"
_MESSAGE_COLUMNS = (
    "id, account, owner, direction, size, sha256, from_addr, to_addrs, subject, date,"
    " message_id, visibility, reason, received_at"
)


def _rows(start: int, end: int, records: int) -> Iterator[tuple[str, str, list[tuple[Any, ...]]]]:
    batch = range(start, end)
    yield (
        "messages",
        _MESSAGE_COLUMNS,
        [
            (
                n + 1,
                "a",
                "alice",
                "in",
                2048,
                hashlib.sha256(str(n).encode()).hexdigest(),
                f"r{n % records}@customer.example",
                '["alice@crm.example"]',
                f"Message {n}",
                _DATE,
                f"<m{n}@customer.example>",
                "shared" if n % 2 else "private",
                "public" if n % 2 else "mode_private",
                _DATE,
            )
            for n in batch
        ],
    )
    # The store's triggers copy what a record's page reads onto the links and messages.
    yield (
        "message_records",
        "message, record, sort_key",
        [(n + 1, f"R{n % records}", _DATE) for n in batch],
    )
    yield (
        "message_addresses",
        "message, role, address",
        [(n + 1, "from", f"r{n % records}@customer.example") for n in batch],
    )


def build(directory: Path, messages: int, records: int, pg: Postgres | None = None) -> Path:
    database = directory / "mail.db"
    config = directory / "mailingest.toml"
    if pg is None:
        config.write_text(f'[storage]\ndatabase = "{database}"\n')
    else:
        secret = directory / "db-password"
        secret.write_text(pg.password + "\n")
        secret.chmod(0o600)
        url = pg.new_database()
        config.write_text(f'[storage]\ndatabase = "{url}"\npassword = {{ file = "{secret}" }}\n')
    config.chmod(0o600)
    if pg is None and database.exists():
        return config
    csv = directory / "records.csv"
    rows = [f"R{i},lead,r{i}@customer.example,Record {i}" for i in range(records)]
    csv.write_text("id,kind,email,name\n" + "\n".join(rows) + "\n")
    cli(config, "records", "import", str(csv))
    started = time.monotonic()
    if pg is None:
        _fill_sqlite(database, messages, records)
    else:
        _fill_postgres(pg, url, messages, records)
    print(f"stored {messages:,} messages in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return config


def _fill_sqlite(database: Path, messages: int, records: int) -> None:
    db = sqlite3.connect(database)
    db.execute("PRAGMA synchronous = OFF")
    with db:
        for start in range(0, messages, 50_000):
            for table, columns, rows in _rows(start, min(start + 50_000, messages), records):
                marks = ", ".join("?" * len(rows[0]))
                db.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
    db.execute("ANALYZE")
    db.close()


def _fill_postgres(pg: Postgres, url: str, messages: int, records: int) -> None:
    import psycopg

    with psycopg.connect(url, password=pg.password) as db:
        for start in range(0, messages, 50_000):
            for table, columns, rows in _rows(start, min(start + 50_000, messages), records):
                with db.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
        db.commit()
        db.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'), %s)", (messages,))
        db.commit()
    with psycopg.connect(url, password=pg.password, autocommit=True) as db:
        db.execute("VACUUM ANALYZE")


def warm(config: Path) -> None:
    """Read the database once: a store kept with ``--dir`` may have left the page cache,
    and a run that reads it back from disk measures the disk."""
    database = config.parent / "mail.db"
    if not database.exists():
        return  # PostgreSQL: just written, in its buffers and the page cache
    with database.open("rb") as data:
        while data.read(1 << 20):
            pass


def serve(config: Path, port: int, processes: int = 1) -> subprocess.Popen[bytes]:
    text = config.read_text()
    text = re.sub(r"\n\[(api|daemon)\][^\[]*", "\n", text)
    text += f'\n[daemon]\nlog_format = "json"\n\n[api]\nlisten = "127.0.0.1:{port}"\n'
    text += f"processes = {processes}\n"
    config.write_text(text)
    log = (config.parent / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [PYTHON, "-m", "mailingest", "-c", str(config), "run"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # wrk's connections are spread when they connect: every helper must listen first.
        helpers = (config.parent / "daemon.log").read_text().count('"api_helper_started"')
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200 and helpers == processes - 1:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the API did not come up; see {config.parent / 'daemon.log'}")


def first_page(port: int, token: str, record: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/messages?limit=50&record={record}",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return len(json.loads(reply.read())["messages"])


def wrk(
    port: int,
    token: str,
    clients: int,
    seconds: int,
    records: int,
    think: int,
    stagger: bool,
    tmp: Path,
) -> dict[str, object]:
    """``think``: milliseconds each client waits between its requests (0: back to back,
    the server saturated; latency then is mostly waiting in its queue). wrk waits that
    long before each connection's first request too, so all of them start at once: 50
    requests queued together, about 1 % of a 30 s run, which is where its p99 then
    falls. ``stagger``: each connection's first wait is a random part of ``think``."""
    script = tmp / "records.lua"
    flag = "true" if stagger else "false"
    script.write_text(SCRIPT.format(records=records, think=think, clients=clients, stagger=flag))
    done = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(script),
         "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        check=True,
        timeout=seconds + 60,
    )  # fmt: skip
    out = done.stdout.decode()
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", out, flags=re.MULTILINE))
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50": percentiles.get("50"),
        "p90": percentiles.get("90"),
        "p99": percentiles.get("99"),
        "requests_per_s": float(rate.group(1)) if rate else None,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "raw": out,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument(
        "--think", type=int, default=0, metavar="MS", help="each client's pause between requests"
    )
    parser.add_argument(
        "--stagger",
        action="store_true",
        help="start each connection after a random part of --think, not all at once",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="[api] processes: the daemon and its helpers"
    )
    parser.add_argument("--dir", type=Path, help="keep the store here (built once)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--postgresql", action="store_true", help="store on a private PostgreSQL cluster"
    )
    args = parser.parse_args()
    if args.postgresql and os.geteuid() != 0:
        raise SystemExit("--postgresql runs as root (the cluster runs as the postgres user)")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mailingest-api-bench-"))
        pg = stack.enter_context(private_postgres(durable=True)) if args.postgresql else None
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        config = build(directory, args.messages, args.records, pg)
        warm(config)
        token = json.loads(cli(config, "api", "token", "create", "--user", "bob", "--json"))
        port = free_port()
        daemon = serve(config, port, args.processes)
        try:
            shown = first_page(port, token["token"], "R1")
            assert shown == 50, f"bob sees {shown} messages of R1's first page, not 50"
            figures = wrk(
                port,
                token["token"],
                args.clients,
                args.seconds,
                args.records,
                args.think,
                args.stagger,
                Path(tmp),
            )
        finally:
            daemon.terminate()
            daemon.wait(30)
    figures |= {"messages": args.messages, "records": args.records, "clients": args.clients}
    figures["think_ms"] = args.think
    figures["stagger"] = args.stagger
    figures["backend"] = "postgresql" if args.postgresql else "sqlite"
    figures["processes"] = args.processes
    print(figures.pop("raw"), file=sys.stderr)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

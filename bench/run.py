"""mailingest benchmark: the issue's cases P1-P5, side by side with mpop, fetchmail and getmail6.

usage: python bench/run.py [--quick] [--cases P1,P2,P3,P4,P5] [--tools mailingest,mpop,...]

Starts a private Dovecot on loopback (needs root and dovecot-pop3d, like the test suite),
generates deterministic synthetic mail, runs every installed tool on each case into a fresh
store or Maildir, leaving the mail on the server, and prints wall time and peak RSS (median of
--runs, default 3; --quick: 1) with the ratio to mpop. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import poplib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # the test suite's private-Dovecot fixture

from mailgen import Maildir, fill  # noqa: E402
from measure import run_measured  # noqa: E402
from tools import (  # noqa: E402
    Account,
    Fetchmail,
    Getmail,
    Mailingest,
    Mpop,
    Outcome,
    SerialPoplib,
    Tool,
)

from dovecot import Dovecot, DovecotMissing, ensure_mail_user, free_port, private_dovecot  # noqa: E402
from postgres import Postgres, PostgresMissing, private_postgres  # noqa: E402

ALL_CASES = ("P1", "P2", "P3", "P4", "P5")
RTT_MS = 20.0
P1_MESSAGES = 5000
P2_MESSAGES = 200
FLEET_ACCOUNTS, FLEET_MESSAGES = 200, 20
P4_BYTES = 200 * 1024 * 1024
P4_RSS_LIMIT_MB = 100
P5_MESSAGES = 450  # more than two group-commit batches
FLEET_FACTOR = 15
RUN_TIMEOUT = 1800.0


@dataclass
class Case:
    key: str
    title: str
    accounts: list[Account]
    expected: list[str]  # sha256 of every served message, sorted
    tools: list[Tool]
    #: Extra checks of a mailingest run, before its store is removed (first run only).
    check: Callable[[Mailingest, Path, Row], None] | None = None


@dataclass
class Row:
    case: str
    tool: str
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    server_cpus: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    exact_rss: bool = True
    fetched: int = 0
    expected: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(self.cpus) if self.cpus else None

    @property
    def server_cpu(self) -> float | None:
        return statistics.median(self.server_cpus) if self.server_cpus else None

    @property
    def rss(self) -> float | None:
        return max(self.rss_mb) if self.rss_mb else None


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- environment -------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    distro = "?"
    if Path("/etc/os-release").exists():
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    dovecot_version = subprocess.run(
        [shutil.which("dovecot") or "dovecot", "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory": f"{mem_kb / 1024 / 1024:.0f} GiB",
        "os": f"{distro}, Linux {platform.release()}",
        "filesystem": _fs_type(Path(tempfile.gettempdir())),
        "python": platform.python_version(),
        "dovecot": dovecot_version,
    }


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if str(path.resolve()).startswith(point) and len(point) > len(best):
                best, kind = point, fstype
    return kind


def server_cpu(server: Dovecot) -> float:
    """CPU seconds used so far by Dovecot: its live processes plus the children it reaped."""
    try:
        master = int((server.run_dir / "master.pid").read_text().split()[0])
    except (OSError, ValueError):
        return 0.0
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # comm may hold spaces
        if int(fields[2]) != master:  # the process group Dovecot leads
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if int(entry.name) == master:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    return ticks / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def proxy(target: int, one_way_ms: float, gate: Path | None = None) -> Iterator[int]:
    """A latency proxy process in front of ``target``; yields its port."""
    port = free_port()
    argv = [sys.executable, str(BENCH / "latency_proxy.py"), str(port), str(target)]
    argv.append(str(one_way_ms))
    if gate is not None:
        argv += ["--gate", str(gate)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("latency proxy did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def warm(account: Account, *, retrieve: bool = True) -> dict[int, str]:
    """One plain session that lists (and reads) everything: Dovecot builds its indexes and
    moves new/ to cur/ now, not during the first measured run. Returns number -> UIDL."""
    pop = poplib.POP3(account.host, account.port, timeout=120)
    try:
        pop.user(account.user)
        pop.pass_(account.password)
        listing: dict[int, str] = {}
        for line in pop.uidl()[1]:
            number, uidl = line.split()
            listing[int(number)] = uidl.decode()
        pop.list()
        if retrieve:
            for num in listing:
                pop.retr(num)
        pop.quit()
    finally:
        pop.close()
    return listing


def mailbox(server: Dovecot, name: str) -> tuple[Account, Maildir]:
    password = f"pw-{name}-bench"
    path = server.add_user(name, password)
    return Account(name, server.host, server.port, name, password), Maildir(path)


# -- cases -------------------------------------------------------------------------------------


def run_case(server: Dovecot, case: Case, runs: int, work: Path, keep: bool) -> list[Row]:
    rows = {t.name: Row(case.key, t.name, expected=len(case.expected)) for t in case.tools}
    _log(f"== {case.key}: {case.title} (load average {load()})")
    for rep in range(runs):
        # Rotate the order every repetition, so no tool always runs right after another.
        order = case.tools[rep % len(case.tools) :] + case.tools[: rep % len(case.tools)]
        for tool in order:
            row = rows[tool.name]
            directory = work / case.key / _slug(tool.name) / str(rep)
            directory.mkdir(parents=True)
            before = server_cpu(server)
            outcome = tool.run(directory, case.accounts, RUN_TIMEOUT)
            row.server_cpus.append(server_cpu(server) - before)
            _record(row, tool, outcome, case, directory)
            if rep == 0 and case.check is not None and isinstance(tool, Mailingest):
                case.check(tool, directory, row)
            m = outcome.measured
            _log(
                f"   {tool.name:<32} run {rep + 1}: {m.wall_s:7.2f} s wall {m.cpu_s:6.2f} s CPU "
                f"{m.peak_rss_mb:7.1f} MB  fetched {outcome.fetched}"
                + (f"  ERROR {outcome.error}" if outcome.error else "")
            )
            if not keep:
                shutil.rmtree(directory, ignore_errors=True)
    return list(rows.values())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _record(row: Row, tool: Tool, outcome: Outcome, case: Case, directory: Path) -> None:
    row.walls.append(outcome.measured.wall_s)
    row.cpus.append(outcome.measured.cpu_s)
    row.rss_mb.append(outcome.measured.peak_rss_mb)
    row.exact_rss &= outcome.measured.exact_rss
    row.fetched = outcome.fetched
    if outcome.error:
        row.errors.append(outcome.error)
    if outcome.note:
        row.notes.append(outcome.note)
    if outcome.fetched != len(case.expected) and tool.stores:
        row.errors.append(f"fetched {outcome.fetched} of {len(case.expected)}")
    if isinstance(tool, Mailingest) and outcome.fetched:
        if Mailingest.stored_hashes(directory) != case.expected:
            row.errors.append("stored bytes differ from the served bytes")
        elif "byte-exact (sha256 of every message)" not in row.notes:
            row.notes.append("byte-exact (sha256 of every message)")


def raw_readback(tool: Mailingest, directory: Path, config: Path) -> str:
    """sha256 of message 1's raw bytes as `mailingest show --raw` streams them out."""
    import hashlib

    argv = [*tool.argv(config)[:5], "show", "1", "--viewer", "bench", "--raw"]  # owner: bench
    digest = hashlib.sha256()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=directory) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def case_p4(server: Dovecot, tools: list[Tool], runs: int, work: Path, keep: bool) -> list[Row]:
    account, box = mailbox(server, "p4")
    size, expected = box.deliver_huge(P4_BYTES)
    warm(account, retrieve=False)

    def read_back(tool: Mailingest, directory: Path, row: Row) -> None:
        if raw_readback(tool, directory, directory / "mailingest.toml") == expected:
            row.notes.append(f"`show --raw` streams back the {size} served bytes exactly")
        else:
            row.errors.append("`show --raw` bytes differ from the served message")

    title = f"one {size / 1e6:.0f} MB message, loopback"
    case = Case("P4", title, [account], [expected], tools, check=read_back)
    return run_case(server, case, runs, work, keep)


def case_p5(server: Dovecot, work: Path) -> tuple[Row, list[dict[str, object]]]:
    """A deleting fetch through a proxy that holds every DELE until it has seen, in the
    store through its own connection, the committed ledger row and the right hash."""
    account, box = mailbox(server, "p5")
    hashes = fill(box, "p5", P5_MESSAGES, seed=5)
    listing = warm(account)
    directory = work / "P5" / "mailingest"
    directory.mkdir(parents=True)
    ours = Mailingest()
    log = directory / "gate.jsonl"
    by_uidl = dict(zip([listing[n] for n in sorted(listing)], hashes, strict=True))
    gate = directory / "gate.json"
    gate.write_text(
        json.dumps(
            {
                "database": str(directory / "mail.db"),
                "account": account.name,
                "uidls": listing,
                "sha256": by_uidl,
                "log": str(log),
            }
        )
    )
    row = Row("P5", "mailingest", expected=P5_MESSAGES)
    with proxy(server.port, 0.0, gate) as port:
        via = Account(account.name, account.host, port, account.user, account.password)
        config = ours.config(directory, [via], leave_on_server=False)
        measured = run_measured(ours.argv(config), cwd=directory, timeout=RUN_TIMEOUT)
        time.sleep(0.05)  # the proxy's last log lines
    events = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    deles = [e for e in events if e["event"] == "dele"]
    row.walls.append(measured.wall_s)
    row.cpus.append(measured.cpu_s)
    row.rss_mb.append(measured.peak_rss_mb)
    row.fetched = len(Mailingest.stored_hashes(directory))
    bad = [e for e in deles if not e["ok"]]
    if measured.exit_code != 0:
        row.errors.append(f"fetch exited {measured.exit_code}")
    if len(deles) != P5_MESSAGES:
        row.errors.append(f"{len(deles)} DELE seen, {P5_MESSAGES} expected")
    if bad:
        row.errors.append(f"{len(bad)} DELE before their message was committed: {bad[:3]}")
    if server.count(account.user) != 0:
        row.errors.append(f"{server.count(account.user)} messages left on the server")
    commits = [e for e in events if e["event"] == "ledger_rows"]
    first_dele = min((e["t"] for e in deles), default=None)
    steps = ", ".join(f"{c['count']} @ {c['t']:.2f}s" for c in commits)
    row.notes.append(
        f"{len(deles)} DELE checked at arrival, {len(bad)} uncommitted; ledger rows seen: "
        f"{steps}; first DELE @ {first_dele:.2f}s"
        if first_dele is not None
        else "no DELE seen"
    )
    return row, events


def _one_session_too(tools: list[Tool]) -> list[Tool]:
    """The tools, plus mailingest limited to one session per cycle as mpop does: by default
    a cycle that stored mail opens another session (Gmail lists ~250 per session), which
    costs a login and a listing more than mpop's single session."""
    out = list(tools)
    if any(isinstance(t, Mailingest) for t in out):
        out.insert(1, Mailingest(max_sessions=1))
    return out


def build_cases(
    server: Dovecot,
    keys: Sequence[str],
    tools: dict[str, Tool],
    proxied: Callable[[], int],
    fleet_concurrency: int | None,
) -> Iterator[Case]:
    peers = [t for t in tools.values() if t.available()]
    if "P1" in keys:
        account, box = mailbox(server, "p1")
        expected = sorted(fill(box, "p1", P1_MESSAGES, seed=1))
        warm(account)
        yield Case("P1", f"{P1_MESSAGES} messages, loopback", [account], expected, peers)
    if "P2" in keys:
        account, box = mailbox(server, "p2")
        expected = sorted(fill(box, "p2", P2_MESSAGES, seed=2))
        warm(account)
        port = proxied()
        via = Account(account.name, account.host, port, account.user, account.password)
        title = f"{P2_MESSAGES} messages, {RTT_MS:.0f} ms RTT"
        yield Case("P2", title, [via], expected, _one_session_too(peers))
    if "P3" in keys:
        port = proxied()
        accounts, expected = [], []
        for i in range(FLEET_ACCOUNTS):
            account, box = mailbox(server, f"f{i:03d}")
            expected += fill(box, f"f{i:03d}", FLEET_MESSAGES, seed=1000 + i)
            warm(account)
            via = Account(account.name, account.host, port, account.user, account.password)
            accounts.append(via)
        # fetchmail and getmail6 would take many minutes here; the target is against mpop.
        fleet: list[Tool] = [t for t in peers if isinstance(t, Mailingest | Mpop)]
        if fleet_concurrency and any(isinstance(t, Mailingest) for t in fleet):
            fleet.insert(1, Mailingest(max_concurrent=fleet_concurrency))
            fleet.insert(2, Mailingest(max_concurrent=fleet_concurrency, max_sessions=1))
        title = f"{FLEET_ACCOUNTS} accounts x {FLEET_MESSAGES} messages, {RTT_MS:.0f} ms RTT"
        yield Case("P3", title, accounts, sorted(expected), fleet)


# -- report ------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[Row], runs: int) -> str:
    mpop = {r.case: r.wall for r in rows if r.tool == "mpop" and r.wall and not r.errors}
    out = [
        f"| case | tool | wall s (median of {runs}) | vs mpop | CPU s | Dovecot CPU s "
        "| peak RSS MB | fetched | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.wall / mpop[r.case] if r.wall and mpop.get(r.case) else None
        rss = _fmt(r.rss, ".1f") + ("" if r.exact_rss else " (upper bound)")
        notes = "; ".join(dict.fromkeys([*r.notes, *(f"**{e}**" for e in r.errors)]))
        fetched = f"{r.fetched}/{r.expected}" if r.expected else "—"
        out.append(
            f"| {r.case} | {r.tool} | {_fmt(r.wall, '.2f')} | {_fmt(ratio, '.2f')} "
            f"| {_fmt(r.cpu, '.2f')} | {_fmt(r.server_cpu, '.2f')} | {rss} | {fetched} | {notes} |"
        )
    return "\n".join(out)


def verdicts(rows: list[Row]) -> str:
    def mpop(case: str) -> Row | None:
        return next((r for r in rows if r.case == case and r.tool == "mpop" and r.wall), None)

    ours = [r for r in rows if r.tool.startswith("mailingest") and r.wall is not None]
    out = ["| target | measured | met |", "|---|---|---|"]
    for r in ours:
        peer = mpop(r.case)
        assert r.wall is not None
        if r.case in ("P1", "P2") and peer and peer.wall:
            ratio = r.wall / peer.wall
            out.append(
                f"| {r.case} ours / mpop ≤ 1.0 | {ratio:.2f} ({r.wall:.2f} s vs {peer.wall:.2f} s)"
                f" | {_met(ratio <= 1.0 and not r.errors, ratio)} |"
            )
        elif r.case == "P3" and peer and peer.wall:
            budget = peer.wall / FLEET_FACTOR
            out.append(
                f"| P3 {r.tool} ≤ mpop sequential / {FLEET_FACTOR} = {budget:.2f} s "
                f"| {r.wall:.2f} s ({peer.wall / r.wall:.1f} times faster than mpop) "
                f"| {_met(r.wall <= budget and not r.errors, r.wall / budget)} |"
            )
        elif r.case == "P4" and r.rss is not None:
            ok = r.rss <= P4_RSS_LIMIT_MB and not r.errors
            exact = "byte-exact" if not r.errors else "; ".join(r.errors)
            out.append(
                f"| P4 peak RSS ≤ {P4_RSS_LIMIT_MB} MB, byte-exact | {r.rss:.1f} MB, {exact} "
                f"| {'yes' if ok else 'NO'} |"
            )
        elif r.case == "P5":
            out.append(
                f"| P5 every message durable before any DELE | "
                f"{'; '.join(r.errors) or 'no DELE before its commit'} "
                f"| {'yes' if not r.errors else 'NO'} |"
            )
    return "\n".join(out)


def _met(ok: bool, ratio: float) -> str:
    return "yes" if ok else f"NO (by {(ratio - 1) * 100:.0f} %)"


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one run per tool (default 3)")
    parser.add_argument("--runs", type=int, help="runs per tool and case (median reported)")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="e.g. P1,P2")
    parser.add_argument(
        "--tools",
        default="mailingest,mailingest-pg,mpop,fetchmail,getmail6,poplib",
        help="subset of mailingest,mailingest-pg (on a private PostgreSQL),mpop,fetchmail,"
        "getmail6,poplib",
    )
    parser.add_argument(
        "--fleet-concurrency",
        type=int,
        default=64,
        help="P3 also runs mailingest with this max_concurrent (0: only the default, 16)",
    )
    parser.add_argument("--keep", action="store_true", help="keep stores and Maildirs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    return parser.parse_args(argv)


def _catalog(databases: ExitStack) -> dict[str, Tool]:
    """Every tool the bench knows; mailingest-pg starts a private PostgreSQL on first use,
    kept in ``databases`` until the bench ends."""
    clusters: list[Postgres] = []

    def new_database() -> tuple[str, str]:
        if not clusters:
            clusters.append(databases.enter_context(private_postgres(durable=True)))
        return clusters[0].new_database(), clusters[0].password

    return {
        "mailingest": Mailingest(),
        "mailingest-pg": Mailingest(postgres=new_database),
        "mpop": Mpop(),
        "fetchmail": Fetchmail(),
        "getmail6": Getmail(deliver_as=ensure_mail_user().pw_name),
        "poplib": SerialPoplib(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    keys = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    unknown = set(keys) - set(ALL_CASES)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: {', '.join(ALL_CASES)}")
    databases = ExitStack()
    catalog = _catalog(databases)
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    tools = {k: catalog[k] for k in wanted if k in catalog}
    if not Mailingest().available():
        raise SystemExit("mailingest is not importable by this Python: pip install -e . first")
    Mailingest.compile()
    if os.geteuid() != 0:
        raise SystemExit("the bench runs a private Dovecot as root (like the test suite)")
    info = machine()
    versions = {}
    for key, tool in tools.items():
        versions[key] = tool.version() if tool.available() else "not installed"
        _log(f"{key}: {versions[key]}")
    work = Path(tempfile.mkdtemp(prefix="mailingest-bench-"))
    work.chmod(0o755)
    rows: list[Row] = []
    p5_events: list[dict[str, object]] = []
    started = time.monotonic()
    try:
        with private_dovecot() as server, ExitStack() as stack:
            ports: list[int] = []

            def proxied() -> int:
                """The latency proxy in front of Dovecot, started on first use."""
                if not ports:
                    ports.append(stack.enter_context(proxy(server.port, RTT_MS / 2)))
                return ports[0]

            fleet = args.fleet_concurrency
            for case in build_cases(server, keys, tools, proxied, fleet):
                rows += run_case(server, case, runs, work, args.keep)
            if "P4" in keys:
                big = [t for t in tools.values() if t.available() and t.stores]
                rows += case_p4(server, big, runs, work, args.keep)
            if "P5" in keys and "mailingest" in tools:
                row, p5_events = case_p5(server, work)
                rows.append(row)
    except (DovecotMissing, PostgresMissing) as exc:
        raise SystemExit(str(exc)) from exc
    finally:
        databases.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for key, tool in tools.items():
        if not tool.available():
            rows.append(Row("all", key, notes=["not installed"]))
    report(info, versions, rows, runs, time.monotonic() - started)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "versions": versions,
                    "rows": [r.__dict__ for r in rows],
                    "p5_events": p5_events,
                },
                indent=1,
            )
        )
    return 1 if any(r.errors for r in rows) else 0


def report(
    info: dict[str, str], versions: dict[str, str], rows: list[Row], runs: int, took: float
) -> None:
    print(f"\nMachine: {info['cpu']}, {info['memory']} RAM, {info['os']}, {info['filesystem']}")
    print(f"Python {info['python']}, Dovecot {info['dovecot']}")
    print("Tools: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"Load average at the end: {load()} (other work on the machine shows up here)")
    print(f"Bench took {took:.0f} s\n")
    print(table(rows, runs))
    print()
    print(verdicts(rows))


if __name__ == "__main__":
    sys.exit(main())

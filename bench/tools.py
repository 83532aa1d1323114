"""The measured retrievers: mailingest, the peers (mpop, fetchmail, getmail6) and a baseline.

Each tool gets a fresh work directory per run, writes its own config there, fetches every
message of the given accounts leaving them on the server, and reports how many it got.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from measure import Measured, run_measured


@dataclass(frozen=True)
class Account:
    name: str
    host: str
    port: int
    user: str
    password: str


@dataclass(frozen=True)
class Outcome:
    measured: Measured
    fetched: int
    error: str | None = None
    note: str | None = None


def _maildir(root: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _count_maildir(root: Path) -> int:
    return sum(
        1
        for sub in ("new", "cur")
        for d in root.rglob(sub)
        if d.is_dir()
        for f in d.iterdir()
        if f.is_file()
    )


def _write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def _tail(path: Path, limit: int = 600) -> str:
    return path.read_text(errors="replace")[-limit:].strip() if path.exists() else ""


class Tool:
    name = "?"
    program = "?"
    #: False for the baseline, which only reads (the floor of a serial reader).
    stores = True

    def available(self) -> bool:
        return shutil.which(self.program) is not None

    def version(self) -> str:
        return "?"

    def run(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        raise NotImplementedError


class Mailingest(Tool):
    name = "mailingest"
    program = sys.executable

    def __init__(
        self,
        *,
        max_concurrent: int | None = None,
        max_sessions: int | None = None,
        postgres: Callable[[], tuple[str, str]] | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_sessions = max_sessions
        #: Gives a new PostgreSQL database (URL, password) per run; None: SQLite.
        self.postgres = postgres
        settings = [f"max_concurrent={max_concurrent}"] if max_concurrent is not None else []
        if max_sessions is not None:
            settings.append(f"max_sessions_per_cycle={max_sessions}")
        if postgres is not None:
            settings.append("on PostgreSQL")
        if settings:
            self.name = "mailingest " + " ".join(settings)

    def available(self) -> bool:
        probe = [sys.executable, "-c", "import mailingest"]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0

    @staticmethod
    def compile() -> None:
        """Byte-compile the package, so that a run starts as an installed one does (pip
        compiles what it installs). An editable checkout under PYTHONDONTWRITEBYTECODE
        would compile every module from source at every start: some 50 ms of a fetch."""
        probe = "import mailingest, pathlib; print(pathlib.Path(mailingest.__file__).parent)"
        found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        package = found.stdout.strip()
        subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)

    def version(self) -> str:
        probe = [sys.executable, "-m", "mailingest", "--version"]
        done = subprocess.run(probe, capture_output=True, text=True, check=False)
        return done.stdout.strip() or "?"

    def config(self, work: Path, accounts: Sequence[Account], **extra: object) -> Path:
        storage = ['database = "mail.db"']
        if self.postgres is not None:
            url, password = self.postgres()
            _write_secret(work / "db-password", password + "\n")
            (work / "db-url").write_text(url)
            storage = [f"database = {json.dumps(url)}", 'password = { file = "db-password" }']
        lines = ["[storage]", *storage, "", "[daemon]", 'log_format = "json"']
        if self.max_concurrent is not None:
            lines.append(f"max_concurrent = {self.max_concurrent}")
        if self.max_sessions is not None:
            lines.append(f"max_sessions_per_cycle = {self.max_sessions}")
        for a in accounts:
            lines += [
                "",
                "[[accounts]]",
                f"name = {json.dumps(a.name)}",
                'owner = "bench"',
                f"host = {json.dumps(a.host)}",
                f"port = {a.port}",
                'security = "plain"',
                "allow_plaintext = true",
                f"username = {json.dumps(a.user)}",
                f"password = {json.dumps(a.password)}",
                'timeout = "120s"',
            ]
            for key, value in extra.items():
                lines.append(f"{key} = {json.dumps(value)}")
        return _write_secret(work / "mailingest.toml", "\n".join(lines) + "\n")

    def argv(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"]

    def run(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        config = self.config(work, accounts)
        measured = run_measured(self.argv(config), cwd=work, timeout=timeout)
        try:
            report = json.loads(measured.stdout.read_text())
            results = report["accounts"]
        except (ValueError, KeyError):
            return Outcome(measured, 0, f"no JSON report: {_tail(measured.stderr)}")
        bad = [r for r in results if r["status"] != "ok"]
        error = f"{len(bad)} accounts failed, e.g. {bad[0]}" if bad else None
        return Outcome(measured, sum(int(r["new"]) for r in results), error)

    @staticmethod
    def stored_hashes(work: Path) -> list[str]:
        """The sha256 of every stored message (the store's own record of what it hashed)."""
        if (work / "db-url").exists():
            import psycopg

            url, password = (work / "db-url").read_text(), (work / "db-password").read_text()
            with psycopg.connect(url, password=password.strip()) as conn:
                return sorted(r[0] for r in conn.execute("SELECT sha256 FROM messages"))
        db = sqlite3.connect(work / "mail.db")
        try:
            return sorted(r[0] for r in db.execute("SELECT sha256 FROM messages"))
        finally:
            db.close()


class Mpop(Tool):
    name = "mpop"
    program = "mpop"

    def version(self) -> str:
        out = subprocess.run(["mpop", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.splitlines()[0] if out.stdout else "?"

    def run(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        blocks = [f"defaults\ntls off\nauth user\nkeep on\nonly_new off\nuidls_file {work}/uidls"]
        for a in accounts:
            box = _maildir(work / "Maildir" / a.name)
            blocks.append(
                f"account {a.name}\nhost {a.host}\nport {a.port}\nuser {a.user}\n"
                f"password {json.dumps(a.password)}\ndelivery maildir {box}"
            )
        rc = _write_secret(work / "mpoprc", "\n\n".join(blocks) + "\n")
        measured = run_measured(["mpop", "-q", "-C", str(rc), "-a"], cwd=work, timeout=timeout)
        error = None if measured.exit_code == 0 else _tail(measured.stderr)
        return Outcome(measured, _count_maildir(work / "Maildir"), error)


class Fetchmail(Tool):
    name = "fetchmail"
    program = "fetchmail"

    def version(self) -> str:
        out = subprocess.run(["fetchmail", "-V"], capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if "release" in x), "?")
        return line.replace("This is ", "").split("+")[0]

    def run(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        polls = ["set no syslog"]
        for a in accounts:
            box = _maildir(work / "Maildir" / a.name)
            # fetchmail has no Maildir delivery: a one-line MDA writes each message to new/.
            mda = f"/bin/sh -c 'cat > {box}/new/$(date +%s%N).$$'"
            polls.append(
                f"poll {a.host} protocol pop3 port {a.port} auth password\n"
                f'  user "{a.user}" password {json.dumps(a.password)} is root here\n'
                f'  keep fetchall no sslcertck\n  mda "{mda}"'
            )
        rc = _write_secret(work / "fetchmailrc", "\n".join(polls) + "\n")
        argv = ["fetchmail", "-s", "-f", str(rc), "-i", str(work / "fetchids")]
        argv += ["--pidfile", str(work / "pid")]
        env = {**os.environ, "HOME": str(work)}
        measured = run_measured(argv, cwd=work, env=env, timeout=timeout)
        ok = measured.exit_code in (0, 1)  # 1: no mail
        error = None if ok else _tail(measured.stderr)
        return Outcome(measured, _count_maildir(work / "Maildir"), error)


class Getmail(Tool):
    name = "getmail6"
    program = "getmail"

    def __init__(self, deliver_as: str) -> None:
        # getmail refuses to deliver as root: its delivery child switches to this user.
        self.deliver_as = deliver_as

    def version(self) -> str:
        out = subprocess.run(["getmail", "--version"], capture_output=True, text=True, check=False)
        return out.stdout.strip() or "?"

    def run(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        # getmail6 (6.18) has a SIGCHLD race: when its delivery child exits before the parent
        # waits for it, the parent waits out its socket timeout and gives up ("waiting child
        # pid N timed out"). A short timeout bounds that stall; such a run is repeated in a
        # fresh directory, at most twice, and the table notes it.
        lost = 0
        while True:
            attempt = work / f"attempt{lost}"
            attempt.mkdir()
            attempt.chmod(0o755)
            outcome = self._run_once(attempt, accounts, timeout)
            if lost == 2 or "waiting child pid" not in _tail(outcome.measured.stderr):
                break
            lost += 1
        if lost:
            note = (
                f"{lost} run(s) lost to getmail's child-wait race ({_RACE_TIMEOUT} s stall), rerun"
            )
            return Outcome(outcome.measured, outcome.fetched, outcome.error, note)
        return outcome

    def _run_once(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        rcs = []
        owner = pwd.getpwnam(self.deliver_as)
        for a in accounts:
            box = _maildir(work / "Maildir" / a.name)
            for path in (box, *(box / sub for sub in ("new", "cur", "tmp"))):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            rc = f"getmailrc-{a.name}"
            _write_secret(
                work / rc,
                f"[retriever]\ntype = SimplePOP3Retriever\nserver = {a.host}\nport = {a.port}\n"
                f"username = {a.user}\npassword = {a.password}\ntimeout = {_RACE_TIMEOUT}\n"
                f"[destination]\ntype = Maildir\npath = {box}/\nuser = {self.deliver_as}\n"
                "[options]\ndelete = false\nread_all = true\nverbose = 0\n",
            )
            rcs += ["--rcfile", rc]
        argv = ["getmail", "--getmaildir", str(work), *rcs]
        measured = run_measured(argv, cwd=work, timeout=timeout)
        error = None if measured.exit_code == 0 else _tail(measured.stderr)
        return Outcome(measured, _count_maildir(work / "Maildir"), error)


#: getmail's socket timeout, which is also how long it waits for a delivery child.
_RACE_TIMEOUT = 10


_BASELINE = """
import poplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pop = poplib.POP3(host, port, timeout=120)
pop.user(user)
pop.pass_(password)
count = len(pop.uidl()[1])
for n in range(1, count + 1):
    pop.retr(n)
pop.quit()
print(count)
"""


class SerialPoplib(Tool):
    """The floor of a serial reader: stdlib poplib, RETR one by one, nothing stored."""

    name = "poplib serial (no store)"
    program = sys.executable
    stores = False

    def version(self) -> str:
        return f"Python {sys.version.split()[0]}"

    def run(self, work: Path, accounts: Sequence[Account], timeout: float) -> Outcome:
        a = accounts[0]
        argv = [sys.executable, "-c", _BASELINE, a.host, str(a.port), a.user, a.password]
        measured = run_measured(argv, cwd=work, timeout=timeout)
        text = measured.stdout.read_text().strip()
        fetched = int(text) if text.isdigit() else 0
        error = None if measured.exit_code == 0 else _tail(measured.stderr)
        return Outcome(measured, fetched, error)

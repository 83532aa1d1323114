"""A private PostgreSQL cluster on loopback for the tests: initdb + pg_ctl in a temp dir.

Debian's server binaries live in /usr/lib/postgresql/<version>/bin, off PATH. initdb
refuses to run as root, so under root the cluster runs as the ``postgres`` system user that
Debian's package creates. The cluster trades durability for speed (fsync off): the tests
kill clients, never this server.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dovecot import free_port

SUPERUSER = "mailingest"
#: Distinct per run: the secret-hygiene tests look for it in every output.
PASSWORD = f"pg-test-{uuid.uuid4().hex[:12]}"
START_TIMEOUT = 60


class PostgresMissing(RuntimeError):
    """The PostgreSQL server is not installed. Tests that need it fail on this, never skip."""


def server_bin() -> Path:
    """The directory holding initdb and pg_ctl (the newest installed version)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    raise PostgresMissing(
        "initdb not found: the PostgreSQL tests need a real server. "
        "Install it (apt-get install postgresql); CI installs it."
    )


@dataclass
class Postgres:
    root: Path
    port: int
    bin: Path
    user: str | None  # the system user the server runs as (None: ourselves)
    durable: bool = False  # fsync as in production (the benchmark), not the tests' speed
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    password: str = PASSWORD

    def url(self, database: str = "postgres", *, with_password: bool = False) -> str:
        secret = f":{PASSWORD}" if with_password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str, timeout: float = START_TIMEOUT) -> None:
        done = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            user=self.user,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if done.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()}\n{tail}")

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        self._run(
            "initdb",
            "-D", str(self.data),
            "-U", SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=300"
        )
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"),
            "-w", "-t", str(START_TIMEOUT), "-o", options, "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def dump(self, url: str) -> bytes:
        """pg_dump of one database (schema and data), as an operator would back it up."""
        done = subprocess.run(
            [str(self.bin / "pg_dump"), "--dbname", url],
            env={**os.environ, "PGPASSWORD": self.password},
            capture_output=True,
            timeout=START_TIMEOUT,
            check=True,
        )
        return done.stdout

    def new_database(self) -> str:
        """A new, empty database; its URL (without the password)."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), password=PASSWORD, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def _own(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


@contextmanager
def private_postgres(*, durable: bool = False) -> Iterator[Postgres]:
    """A started cluster in a fresh temp dir; on exit it is stopped and the dir removed."""
    binaries = server_bin()
    user = "postgres" if os.geteuid() == 0 else None
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise PostgresMissing(
                "no 'postgres' system user to run the test cluster as (initdb refuses root); "
                "install Debian's postgresql package"
            ) from None
    root = Path(tempfile.mkdtemp(prefix="mailingest-pg-"))
    try:
        server = Postgres(root, free_port(), binaries, user, durable=durable)
        server._own(root)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

"""The HTTP API tests' world: two owners' Dovecot mailboxes, records, `mailingest run` as a
real process serving [api] on loopback, and tokens made with the CLI."""

from __future__ import annotations

import dataclasses
import functools
import json
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from builders import dovecot_account, numbered_mail
from daemon_support import WAIT, DaemonProcess
from dovecot import Dovecot, Mailbox, free_port
from mailingest.api.helpers import Launch
from mailingest.config import load_config
from support import run_cli, write_config

RECORDS_CSV = """id,kind,email,name
L1,lead,Ann <ann@cust.example>,Ann Lead
L2,lead,ben@other.example,Ben Lead
L3,contact,cleo@third.example,Cleo
"""
RECORDS = ("L1", "L2", "L3")
SENDERS = ("ann@cust.example", "ben@other.example", "cleo@third.example", "x@nowhere.example")
#: The API tests' mail: Message-IDs <m<n>@api.test>.
mail = functools.partial(numbered_mail, domain="api.test")


def api_config(tmp_path: Path, api: str, daemon: str = "") -> Path:
    """A config of no accounts with ``api`` (TOML, e.g. an [api] table) and ``daemon`` lines."""
    path = tmp_path / "mailingest.toml"
    path.write_text(f'[storage]\ndatabase = "mail.db"\n{daemon}{api}')
    path.chmod(0o600)
    return path


class ApiWorld:
    """alice and bob (custom sharing) each own a mailbox; carol owns none. Tokens: one per
    user, an admin, a service token that may act for users."""

    def __init__(
        self,
        directory: Path,
        dovecot: Dovecot,
        *,
        poll: str = "1h",
        alice: Mapping[str, Any] | None = None,
        bob: Mapping[str, Any] | None = None,
        storage: Mapping[str, Any] | None = None,
        file_accounts: bool = True,
        through_helper: bool = False,
    ) -> None:
        """``through_helper``: the daemon runs with ``[api] processes = 2``, and the tests
        talk to a helper process of its own started on another port (HelperProcess)."""
        self.directory = directory
        self.alice: Mailbox = dovecot.new_mailbox()
        self.bob: Mailbox = dovecot.new_mailbox()
        self.port = free_port()
        self.accounts = [
            dovecot_account(
                self.alice, "alice-mail", owner="alice", sharing="custom", **(alice or {})
            ),
            dovecot_account(self.bob, "bob-mail", owner="bob", sharing="custom", **(bob or {})),
        ]
        self.config = write_config(
            directory,
            accounts=self.accounts if file_accounts else [],
            daemon={"poll_interval": poll},
            storage=storage,
        )
        with self.config.open("a") as config:
            config.write(f'\n[api]\nlisten = "127.0.0.1:{self.port}"\n')
            if through_helper:
                config.write("processes = 2\n")
        self.through_helper = through_helper
        self.helper: HelperProcess | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.tokens: dict[str, str] = {}
        self.daemon: DaemonProcess | None = None
        self.http = httpx.Client(base_url=self.url, timeout=WAIT)  # keep-alive: fast tests

    def cli(self, *args: str, code: int = 0) -> str:
        proc = run_cli(self.config, *args)
        assert proc.returncode == code, (args, proc.returncode, proc.stderr.decode())
        return proc.stdout.decode()

    def import_records(self) -> None:
        path = self.directory / "records.csv"
        path.write_text(RECORDS_CSV, encoding="utf-8")
        self.cli("records", "import", str(path))

    def token(self, name: str, user: str, *flags: str) -> str:
        made = json.loads(self.cli("api", "token", "create", "--user", user, "--json", *flags))
        self.tokens[name] = made["token"]
        return str(made["token"])

    def make_tokens(self) -> None:
        for user in ("alice", "bob", "carol"):
            self.token(user, user)
        self.token("admin", "root", "--admin")
        self.token("crm", "crm-service", "--act-for")

    def headers(self, who: str, **more: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}", **more}

    def get(self, who: str | None, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.headers(who) if who else {}
        headers |= kwargs.pop("headers", {})
        return self.http.get(path, headers=headers, **kwargs)

    def send(self, method: str, who: str | None, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.headers(who) if who else {}
        headers |= kwargs.pop("headers", {})
        return self.http.request(method, path, headers=headers, **kwargs)

    def all_messages(self, who: str, params: Mapping[str, str] | None = None) -> list[Any]:
        """Every page of GET /messages, a few at a time (the cursor is exercised)."""
        found: list[Any] = []
        query = {"limit": "3", **(params or {})}
        while True:
            response = self.get(who, "/messages", params=query)
            assert response.status_code == 200, response.text
            body = response.json()
            found += body["messages"]
            if body["next_cursor"] is None:
                return found
            query["cursor"] = body["next_cursor"]

    def cli_messages(self, viewer: str, *args: str) -> list[Any]:
        found: list[Any] = json.loads(self.cli("messages", "--viewer", viewer, "--json", *args))
        return found

    @contextmanager
    def running(self) -> Iterator[DaemonProcess]:
        with DaemonProcess(self.config) as daemon:
            self.daemon = daemon
            self.wait_ready()
            try:
                if self.through_helper:
                    with HelperProcess.beside(daemon) as helper:
                        self.helper = helper
                        self.url = helper.url
                        self.http = httpx.Client(base_url=self.url, timeout=WAIT)
                        yield daemon
                else:
                    yield daemon
            finally:
                self.http.close()
                code, _ = daemon.stop()
                assert code == 0, daemon.text()[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            assert self.daemon is not None and self.daemon.proc.poll() is None, (
                self.daemon.text()[-3000:] if self.daemon else ""
            )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API never became ready"
            time.sleep(0.1)

    def wait_stored(self, count: int) -> None:
        """Until the owners' own mail adds up to ``count`` messages."""
        deadline = time.monotonic() + WAIT
        while self.stored() < count:
            assert time.monotonic() < deadline, f"{self.stored()} of {count} stored"
            time.sleep(0.2)

    def stored(self) -> int:
        own = [m for who in ("alice", "bob") for m in self.all_messages(who) if m["owner"] == who]
        return len(own)


class HelperProcess:
    """One more API helper process (`python -m mailingest.api.worker`) beside a daemon that
    runs its own (``[api] processes`` > 1), on a port of its own, so that a test knows
    which process answers: this one serves the read routes and forwards the rest over the
    daemon's socket (read from its helper's command line). It is told what the daemon
    would tell it (helpers.Launch), but for the port."""

    def __init__(self, config: Path, socket: str, launch: Launch | bytes | None = None) -> None:
        """``launch``: what it is told on its stdin (a Launch, or the raw line); by default
        what the daemon would tell it for ``config``, but for the port, which is its own."""
        self.port = free_port()
        if launch is None:
            launch = dataclasses.replace(Launch.of(load_config(config)), port=self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config.parent / f"helper-{uuid.uuid4().hex[:8]}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "mailingest.api.worker", "--forward", socket],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(launch.line() if isinstance(launch, Launch) else launch)
            self.proc.stdin.flush()
            readable, _, _ = select.select([self.proc.stdout], [], [], WAIT)
            assert readable, f"the helper said nothing in {WAIT} s:\n{self.text()}"
            self.ready = self.proc.stdout.readline()
        except BaseException:
            self.kill()
            raise

    def wait_ready(self) -> HelperProcess:
        try:
            assert json.loads(self.ready or b"null") == {"ready": True}, self.text()
        except BaseException:
            self.kill()
            raise
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    @classmethod
    @contextmanager
    def beside(cls, daemon: DaemonProcess) -> Iterator[HelperProcess]:
        started = daemon.wait_event("api_helper_started")
        args = Path(f"/proc/{started['pid']}/cmdline").read_bytes().split(b"\0")
        socket = args[args.index(b"--forward") + 1].decode()
        helper = cls(daemon.config, socket).wait_ready()
        try:
            yield helper
        finally:
            assert helper.stop() == 0, helper.text()
            assert [line for line in helper.text().splitlines() if '"error"' in line] == []

    def stop(self) -> int:
        """EOF on its stdin, as when its daemon ends: its exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            code = self.proc.wait(WAIT)
        finally:
            if self.proc.returncode is None:
                self.kill()
        self.proc.stdout.close()
        return code

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

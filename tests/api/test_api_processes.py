"""``[api] processes``: helper processes share the daemon's port, answer the read routes
from their own store connection and pass the rest to the daemon. What they answer is
checked route by route in test_api_dovecot.py (its "helper" world); here: their counts in
the daemon's /metrics, their life beside the daemon's, and a helper without its daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from api_support import HelperProcess, api_config
from builders import self_signed_cert
from daemon_support import WAIT, DaemonProcess, wait_until
from dovecot import free_port
from mailingest.api.helpers import Helpers, Launch
from mailingest.config import ApiSettings, load_config
from mailingest.config_render import render_config
from mailingest.metrics import Metrics
from support import run_cli


def _config(tmp_path: Path, processes: int = 2) -> tuple[Path, int]:
    port = free_port()
    api = f'[api]\nlisten = "127.0.0.1:{port}"\nprocesses = {processes}\n'
    return api_config(tmp_path, api, '[daemon]\nlog_format = "json"\n'), port


def _run(config: Path, **env: str) -> subprocess.CompletedProcess[bytes]:
    """`mailingest run` to its end (a failing start), with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "mailingest", "-c", str(config), "run"],
        capture_output=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
    )


def _token(config: Path, user: str) -> dict[str, str]:
    return _token_flags(config, user)


def _token_flags(config: Path, user: str, *flags: str) -> dict[str, str]:
    made = run_cli(config, "api", "token", "create", "--user", user, "--json", *flags)
    assert made.returncode == 0, made.stderr.decode()
    return {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}


def _ready(url: str, daemon: DaemonProcess) -> None:
    def answers() -> bool:
        assert daemon.proc.poll() is None, f"the daemon exited with {daemon.proc.returncode}"
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, f"{url}/readyz")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the daemon's log:\n{daemon.text()}") from None


def _answered(url: str, code: int) -> float:
    text = httpx.get(url + "/metrics", timeout=WAIT).text
    found = re.search(rf'^mailingest_api_requests_total\{{code="{code}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _alive(pid: int) -> bool:
    """Running: not gone, nor a zombie (dead, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


def test_the_helpers_answers_count_in_the_daemons_metrics(tmp_path: Path) -> None:
    config, port = _config(tmp_path)
    url = f"http://127.0.0.1:{port}"
    with DaemonProcess(config) as daemon:
        _ready(url, daemon)
        daemon.wait_event("api_helper_started")
        # A connection each: the kernel spreads them over the daemon and its helper, and
        # each process counts its own (that the helper answers some: the next test).
        for _ in range(40):
            assert httpx.get(url + "/messages", timeout=WAIT).status_code == 401
        # The helper sends its counts every second.
        wait_until(lambda: _answered(url, 401) == 40, "40 answers counted")
        time.sleep(1.5)
        assert _answered(url, 401) == 40  # and none twice
        code, _ = daemon.stop()
        assert code == 0, daemon.text()


def test_the_helper_answers_on_the_shared_port_while_the_daemon_cannot(tmp_path: Path) -> None:
    """The daemon stopped (SIGSTOP): a connection the kernel gives the helper is answered,
    one it gives the daemon waits. Of 40, at least one goes to the helper unless the
    spreading is broken (each is about a coin toss)."""
    config, port = _config(tmp_path)
    url = f"http://127.0.0.1:{port}"
    with DaemonProcess(config) as daemon:
        _ready(url, daemon)
        daemon.wait_event("api_helper_started")
        answered = 0
        daemon.send(signal.SIGSTOP)
        try:
            for _ in range(40):
                try:
                    reply = httpx.get(url + "/messages", timeout=0.3)
                except httpx.TimeoutException:
                    continue
                assert reply.status_code == 401  # the helper checks the token itself
                answered += 1
        finally:
            daemon.send(signal.SIGCONT)
        assert 0 < answered < 40
        code, _ = daemon.stop()
        assert code == 0, daemon.text()


def test_helpers_are_restarted_and_end_with_the_daemon(tmp_path: Path) -> None:
    config, port = _config(tmp_path, processes=3)
    # A killed daemon leaves its socket's directory behind (README): in a directory of the
    # test's own, short (pytest's tmp_path under pytest-xdist is too long for a socket).
    sockets = Path(tempfile.mkdtemp(prefix="mailingest-sock-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, sockets, ignore_errors=True)
        daemon = cleanup.enter_context(DaemonProcess(config, env={"TMPDIR": str(sockets)}))
        _ready(f"http://127.0.0.1:{port}", daemon)
        wait_until(lambda: len(daemon.events("api_helper_started")) == 2, "two helpers")
        first = {e["helper"]: e["pid"] for e in daemon.events("api_helper_started")}
        assert sorted(first) == [1, 2]
        os.kill(first[1], signal.SIGKILL)
        exited = daemon.wait_event("api_helper_exited", helper=1)
        assert exited["code"] == -signal.SIGKILL and exited["level"] == "error"
        wait_until(lambda: len(daemon.events("api_helper_started", helper=1)) == 2, "restart")
        pids = [e["pid"] for e in daemon.events("api_helper_started")]
        # Killed: the daemon's end leaves its helpers reading EOF; they stop themselves.
        daemon.send(signal.SIGKILL)
        daemon.proc.wait(WAIT)
        wait_until(lambda: not any(_alive(pid) for pid in pids), "the helpers to stop")
    with socket.socket() as probe:  # nobody holds the port any more
        probe.bind(("127.0.0.1", port))


def test_a_stopped_daemon_stops_its_helpers_and_removes_its_socket(tmp_path: Path) -> None:
    config, port = _config(tmp_path)
    with DaemonProcess(config) as daemon:
        _ready(f"http://127.0.0.1:{port}", daemon)
        started = daemon.wait_event("api_helper_started")
        args = Path(f"/proc/{started['pid']}/cmdline").read_bytes().split(b"\0")
        forward = Path(args[args.index(b"--forward") + 1].decode())
        assert forward.is_socket() and forward.parent.stat().st_mode & 0o777 == 0o700
        code, _ = daemon.stop()
        assert code == 0, daemon.text()
        assert not _alive(started["pid"])
        assert not forward.parent.exists()
        assert daemon.events("api_helper_exited") == []  # a stop is no failure


def test_a_helper_without_its_daemon_still_reads_and_answers_503_for_the_rest(
    tmp_path: Path,
) -> None:
    config, _ = _config(tmp_path)
    bob = _token(config, "bob")  # creates the store
    helper = HelperProcess(config, str(tmp_path / "no-daemon.sock")).wait_ready()
    try:
        with httpx.Client(base_url=helper.url, timeout=WAIT) as http:
            assert http.get("/messages", headers=bob).json() == {
                "messages": [],
                "next_cursor": None,
            }
            assert http.get("/healthz").json() == {"status": "ok", "store": "ok"}  # its own
            for method, path in (("GET", "/readyz"), ("PUT", "/records/L1/shares/bob")):
                answer = http.request(method, path, headers=bob)
                assert answer.status_code == 503
                assert answer.json()["message"] == "the daemon does not answer; try again"
    finally:
        assert helper.stop() == 0, helper.text()


@pytest.mark.parametrize("processes", ["0", "17", '"2"'])
def test_processes_out_of_range_is_78_naming_the_key(tmp_path: Path, processes: str) -> None:
    path = api_config(tmp_path, f'[api]\nlisten = "127.0.0.1:8025"\nprocesses = {processes}\n')
    done = run_cli(path, "config")
    assert done.returncode == 78
    assert "api.processes" in done.stderr.decode()


def test_a_helper_serves_tls_with_the_daemons_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    api = (
        f'[api]\nlisten = "127.0.0.1:{port}"\nprocesses = 2\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    )
    config = api_config(tmp_path, api, '[daemon]\nlog_format = "json"\n')
    bob = _token(config, "bob")
    trusted = ssl.create_default_context(cafile=str(cert))
    with DaemonProcess(config) as daemon, HelperProcess.beside(daemon) as helper:
        url = helper.url.replace("http:", "https:")
        with httpx.Client(base_url=url, verify=trusted, timeout=WAIT) as http:
            assert http.get("/messages", headers=bob).status_code == 200  # its own
            assert http.get("/readyz").json()["status"] == "ok"  # the daemon's
        code, _ = daemon.stop()
        assert code == 0, daemon.text()


def test_no_room_for_the_daemons_socket_is_78_naming_api_processes(tmp_path: Path) -> None:
    config, port = _config(tmp_path)
    deep = tmp_path / ("d" * 100)  # a Unix socket's path holds at most 107 bytes
    deep.mkdir()
    done = _run(config, TMPDIR=str(deep))
    assert done.returncode == 78, done.stderr.decode()
    assert "api.processes" in done.stderr.decode()
    assert list(deep.iterdir()) == []  # its directory removed again
    with socket.socket() as probe:  # and the port let go
        probe.bind(("127.0.0.1", port))


def test_processes_defaults_to_the_daemon_alone(tmp_path: Path) -> None:
    listen = '[api]\nlisten = "127.0.0.1:8025"\n'
    assert load_config(api_config(tmp_path, listen), {}).api == ApiSettings("127.0.0.1", 8025)
    config = load_config(api_config(tmp_path, listen + "processes = 4\n"), {})
    assert config.api is not None and config.api.processes == 4
    assert "processes = 4" in render_config(config)


def test_a_taken_port_is_78_with_helpers_too(tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second daemon share the port: it is checked first."""
    config, port = _config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = _run(config)
    assert done.returncode == 78, done.stderr.decode()
    assert "api.listen" in done.stderr.decode()


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"version": "0.0.0"}, "the daemon runs 0.0.0"),
        ({"version": "9.9", "new_setting": 1}, "the daemon runs 9.9"),  # checked first
        ({"new_setting": 1}, "not a launch line this version reads"),
        ({"version": None, "port": None}, "the daemon runs None"),
    ],
)
def test_a_helper_refuses_settings_it_cannot_use(
    tmp_path: Path, change: dict[str, object], said: str
) -> None:
    config, _ = _config(tmp_path)
    launch = dataclasses.asdict(Launch.of(load_config(config))) | {"password": "launch-pw-1"}
    fields = launch | change
    line = json.dumps(fields).encode() + b"\n"
    helper = HelperProcess(config, str(tmp_path / "no-daemon.sock"), line)
    assert helper.proc.wait(WAIT) == 78
    assert helper.ready == b""
    [failed] = [json.loads(line) for line in helper.text().splitlines()]
    assert failed["event"] == "api_helper_failed" and said in failed["error"]
    assert "launch-pw-1" not in helper.text()  # the launch's password is never shown
    assert helper.stop() == 78


def test_through_a_helper_requests_reach_the_daemon_as_sent(tmp_path: Path) -> None:
    """A compressed body, an absolute-form request line, and no token with a body too
    large: answered as the daemon answers them."""
    config, _ = _config(tmp_path)
    admin = _token_flags(config, "root", "--admin")
    with DaemonProcess(config) as daemon, HelperProcess.beside(daemon) as helper:
        body = json.dumps({"kind": "lead", "name": "Ann", "emails": ["ann@x.example"]})
        with httpx.Client(base_url=helper.url, timeout=WAIT) as http:
            headers = admin | {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            done = http.put("/records/R1", headers=headers, content=gzip.compress(body.encode()))
            assert done.status_code == 200, done.text
            assert done.json()["record"]["name"] == "Ann"
            assert [r["id"] for r in http.get("/records", headers=admin).json()["records"]] == [
                "R1"
            ]
            big = b"x" * (2 * 1024 * 1024)
            refused = http.put("/records/R2", content=big)
            assert refused.status_code == 401  # who asks first, as the daemon does
        with socket.create_connection(("127.0.0.1", helper.port), timeout=WAIT) as raw:
            raw.sendall(
                b"GET http://elsewhere.example/accounts HTTP/1.1\r\nHost: elsewhere.example\r\n"
                + f"Authorization: {admin['Authorization']}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"accounts": []}
        code, _ = daemon.stop()
        assert code == 0, daemon.text()
    assert daemon.events("api_request_failed") == []


async def test_a_helper_that_exits_78_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """78: it cannot use the daemon's settings (another version): the same at every start."""
    config, _ = _config(tmp_path)
    helpers = Helpers(Launch.of(load_config(config)), 2, Metrics())
    runs: list[int] = []

    async def run(index: int) -> int:
        runs.append(index)
        return 78

    monkeypatch.setattr(helpers, "_run", run)
    await asyncio.wait_for(helpers._keep(1), WAIT)
    assert runs == [1]

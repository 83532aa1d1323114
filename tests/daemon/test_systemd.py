"""sd_notify over real datagram sockets, and the units as systemd-analyze judges them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailingest.systemd import Notifier, one_line, watchdog_period
from support import ROOT

UNITS = ROOT / "systemd"
SERVICES = ("mailingest.service", "mailingest-fetch.service")
ALL_UNITS = (*SERVICES, "mailingest-fetch.timer")
EXEC_START = "/usr/bin/env mailingest "
MAX_EXPOSURE = 2.0


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a file-system path, as systemd's notify socket is."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def _fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.partition("=")[::2] for line in data.split("\n"))


def test_notifier_sends_each_state_as_key_value_lines(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("3 accounts,\n  0 paused")
    assert _fields(sock) == {"READY": "1", "STATUS": "3 accounts, 0 paused"}
    assert notifier.reloading()
    reloading = _fields(sock)
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert notifier.watchdog() and _fields(sock) == {"WATCHDOG": "1"}
    assert notifier.stopping() and _fields(sock) == {"STOPPING": "1"}
    assert notifier.status("x" * 500)
    assert len(_fields(sock)["STATUS"]) <= 200
    notifier.close()


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"mailingest-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert _fields(sock) == {"READY": "1"}
        notifier.close()


def test_notifier_is_a_no_op_outside_systemd_and_never_raises(tmp_path: Path) -> None:
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}):
        notifier = Notifier(env)
        assert not notifier.enabled and not notifier.ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "no-such-socket")})
    assert gone.enabled and not gone.ready() and not gone.watchdog()  # lost, not raised
    gone.close()


def test_watchdog_pings_at_half_the_timeout_for_this_process_only() -> None:
    assert watchdog_period({}) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 15.0
    mine = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_period(mine) == 2.0
    assert watchdog_period({**mine, "WATCHDOG_PID": "1"}) is None


def test_one_line_collapses_whitespace() -> None:
    assert one_line("a\nb\r\n\tc") == "a b c"
    assert one_line("word " * 100, limit=20).endswith("…")


# -- the units -------------------------------------------------------------------------------


def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    # Fail, never skip: CI and scripts/test.sh install the `systemd` package.
    assert found, "systemd-analyze missing: apt-get install systemd"
    return found


def _settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_units_say_what_the_contract_asks() -> None:
    daemon = _settings("mailingest.service")
    assert daemon["Type"] == ["notify"]
    assert daemon["ExecStart"][0].startswith(EXEC_START)
    assert daemon["ExecStart"][0].endswith(" run")
    assert daemon["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert daemon["Restart"] == ["on-failure"]
    assert daemon["WatchdogSec"]
    fetch = _settings("mailingest-fetch.service")
    assert fetch["Type"] == ["oneshot"] and fetch["ExecStart"][0].endswith(" fetch")
    assert fetch["ExecStart"][0].startswith(EXEC_START)
    for unit in (daemon, fetch):
        assert unit["DynamicUser"] == ["yes"] and unit["User"] == ["mailingest"]
        assert unit["StateDirectory"] == ["mailingest"]
        assert unit["ConfigurationDirectory"] == ["mailingest"]
        assert unit["LoadCredential"]
    assert _settings("mailingest-fetch.timer")["Unit"] == ["mailingest-fetch.service"]


def test_systemd_analyze_verify_prints_nothing() -> None:
    """The units as shipped, whether or not mailingest is installed on this machine."""
    proc = subprocess.run(
        [_analyze(), "verify", *(str(UNITS / unit) for unit in ALL_UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_is_at_most_2(unit: str) -> None:
    proc = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--no-pager", str(UNITS / unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout

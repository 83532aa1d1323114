"""Serving [api]: over TLS with the configured certificate; a port taken or an unusable
certificate stops `mailingest run` with 78 naming the key; no [api], no listener."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from api_support import api_config
from builders import self_signed_cert
from daemon_support import WAIT, DaemonProcess, wait_until
from dovecot import free_port

_DAEMON = '[daemon]\nlog_format = "json"\n'


def test_the_api_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    api = f'[api]\nlisten = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    with DaemonProcess(api_config(tmp_path, api, _DAEMON)) as daemon:
        wait_until(lambda: bool(daemon.events("api_started")), "the API to start")
        [started] = daemon.events("api_started")
        assert (started["host"], started["port"], started["tls"]) == ("127.0.0.1", port, True)
        url = f"https://127.0.0.1:{port}/healthz"
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(url, verify=trusted, timeout=WAIT).json()["status"] == "ok"
        try:
            httpx.get(url, timeout=WAIT)  # the system CAs do not know this certificate
        except httpx.ConnectError as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
        else:
            raise AssertionError("an unknown certificate was accepted")
        code, _ = daemon.stop()
    assert code == 0


def _run(config: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mailingest", "-c", str(config), "run"],
        capture_output=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
    )


def test_a_taken_port_stops_the_daemon_with_78_naming_api_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run(api_config(tmp_path, f'[api]\nlisten = "127.0.0.1:{port}"\n', _DAEMON))
    assert proc.returncode == 78, proc.stderr.decode()
    assert b"api.listen" in proc.stderr and b"cannot listen" in proc.stderr


def test_an_unusable_certificate_stops_the_daemon_with_78(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    api = '[api]\nlisten = "127.0.0.1:1"\ntls_cert = "c.pem"\ntls_key = "missing.pem"\n'
    proc = _run(api_config(tmp_path, api, _DAEMON))
    assert proc.returncode == 78, proc.stderr.decode()
    assert b"api.tls_cert" in proc.stderr


def test_no_api_table_no_listener(tmp_path: Path) -> None:
    with DaemonProcess(api_config(tmp_path, "", _DAEMON)) as daemon:
        wait_until(lambda: bool(daemon.events("daemon_started")), "the daemon to start")
        assert daemon.events("api_started") == []
        code, _ = daemon.stop()
    assert code == 0

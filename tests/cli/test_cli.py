"""The CLI as a user runs it: version, demo, config output and errors, logs and secrets."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from builders import loopback_account
from mailingest import __version__, logs
from pop3d import Faults, Mailbox, Pop3dThreaded, ThreadedPop3Server
from postgres import Postgres
from support import ROOT, run_cli, write_config

PACKAGE = ROOT / "daemon" / "mailingest"
README = ROOT / "README.md"
LOG_DOC = ROOT / "docs" / "logging.md"
SECRET = "S3cr3t-Zebra-Quartz-99"


def _account(port: int, **overrides: object) -> dict[str, object]:
    return loopback_account(
        port, **({"name": "a1", "username": "alice", "password": SECRET} | overrides)
    )


def test_version() -> None:
    proc = run_cli(None, "--version")
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == f"mailingest {__version__}"


def test_no_command_is_a_usage_error() -> None:
    assert run_cli(None).returncode == 64
    assert run_cli(None, "fetch", "--bogus").returncode == 64


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_demo_exits_0_and_shows_who_sees_what(backend: str, request: pytest.FixtureRequest) -> None:
    args, env = ["demo"], {}
    if backend == "postgresql":  # `demo --database URL`, the password as libpq reads it
        server: Postgres = request.getfixturevalue("postgres")
        args += ["--database", server.new_database()]
        env["PGPASSWORD"] = server.password
    proc = run_cli(None, *args, env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert "alice-mail" in out and "dana-gmail" in out
    assert "Second fetch: 0 new" in out
    assert "What dana sees (8 messages)" in out


def test_config_prints_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    config = write_config(tmp_path, [_account(110, password={"env": "A1_PW"})])
    proc = run_cli(config, "config", env={"A1_PW": SECRET})
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert SECRET not in out
    assert 'env = "A1_PW"' in out
    assert "leave_on_server = true" in out


def test_config_errors_exit_78_with_key_path(tmp_path: Path) -> None:
    config = write_config(tmp_path, [_account(110, prot=1)])
    proc = run_cli(config, "fetch")
    assert proc.returncode == 78
    assert b'accounts[0] ("a1").prot' in proc.stderr
    config = write_config(tmp_path, [_account(110), _account(110)])
    proc = run_cli(config, "check")
    assert proc.returncode == 78
    assert b'accounts[1] ("a1").name' in proc.stderr
    proc = run_cli(tmp_path / "missing.toml", "status")
    assert proc.returncode == 78 and b"missing.toml" in proc.stderr


@pytest.mark.pop3d_faults(err_on={"PASS": "-ERR [IN-USE] locked by another session"})
def test_pipelined_server_faults_reach_exit_codes(
    tmp_path: Path, pop3d_threaded: Pop3dThreaded
) -> None:
    srv = pop3d_threaded([Mailbox("alice", SECRET, [])])
    config = write_config(tmp_path, [_account(srv.port)])
    proc = run_cli(config, "fetch", "--json")
    assert proc.returncode == 75
    [result] = json.loads(proc.stdout)["accounts"]
    assert result["status"] == "temp_failed" and "a1" in result["error"]


def test_every_logged_event_is_in_the_catalog_and_docs() -> None:
    used: set[str] = set()
    pattern = re.compile(
        r"(?:\blog|get_logger\([^)]*\))\.(?:debug|info|warning|error|exception)\(\s*\"(\w+)\""
    )
    for path in PACKAGE.rglob("*.py"):
        used.update(pattern.findall(path.read_text(encoding="utf-8")))
    assert used, "no log calls found"
    assert used <= set(logs.EVENTS), used - set(logs.EVENTS)
    catalog = LOG_DOC.read_text(encoding="utf-8")
    for event in logs.EVENTS:
        assert f"`{event}`" in catalog, event
    assert "docs/logging.md" in README.read_text(encoding="utf-8")  # the README points there


def test_status_shows_the_next_login_that_login_delay_allows(tmp_path: Path) -> None:
    paced = ThreadedPop3Server(
        [Mailbox("alice", SECRET, [b"Subject: one\n\nhi\n"])], Faults(login_delay=300)
    )
    with paced, ThreadedPop3Server([Mailbox("alice", SECRET, [])]) as plain:
        config = write_config(
            tmp_path, [_account(paced.port), _account(plain.port, name="a2", owner="bob")]
        )
        before = datetime.now(UTC).replace(microsecond=0)
        proc = run_cli(config, "fetch", "--json")
        after = datetime.now(UTC)
    assert proc.returncode == 0, proc.stderr.decode()
    assert [r["new"] for r in json.loads(proc.stdout)["accounts"]] == [1, 0]

    proc = run_cli(config, "status", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    rows = {r["account"]: r for r in json.loads(proc.stdout)["accounts"]}
    assert rows["a2"]["next_login"] is None
    allowed = datetime.fromisoformat(rows["a1"]["next_login"])
    # Kept to the second, rounded up: a login at that time is never too early.
    assert before + timedelta(seconds=300) <= allowed <= after + timedelta(seconds=301)

    proc = run_cli(config, "status")
    assert proc.returncode == 0, proc.stderr.decode()
    header, _, *lines = proc.stdout.decode().splitlines()
    start, end = header.index("next login"), header.index("failures")
    cells = {line.split()[0]: line[start:end].strip() for line in lines}
    assert cells == {"a1": rows["a1"]["next_login"], "a2": ""}

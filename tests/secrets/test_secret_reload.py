"""A password changes without a restart (issue 17, item 9): a reload (SIGHUP) re-reads
``{ file }`` secrets, ``{ credential }`` secrets ($CREDENTIALS_DIRECTORY) and ``{ env }``
secrets kept in ``[daemon] env_file``; an account paused for a rejected login resumes when its
secret changed at its source, and only then. Also the env file's format and its errors.

The daemon runs in-process against the scripted POP3 server, as in test_daemon.py, except
for one test that sends a real SIGHUP to `mailingest run`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from builders import loopback_account, make_message
from daemon_support import DaemonProcess, events, running, until
from mailingest import commands
from mailingest.config import load_config
from mailingest.daemon import Daemon
from mailingest.envfile import EnvFileError, parse_env
from mailingest.errors import ConfigError
from mailingest.logs import capture
from mailingest.retry import Backoff
from pop3d import Mailbox, Pop3TestServer, ThreadedPop3Server
from support import run_cli, write_config

PASSWORD = "Right-Horse-7"
WRONG = "Wrong-Horse-7"
STALE = "Stale-Horse-7"  # the process environment's value, which an env_file overrides
FAST = Backoff(initial=0.2, cap=1.6)
DAEMON = {"poll_interval": "0.5s", "shutdown_timeout": "5s"}


@dataclass
class Source:
    """Where an account's password lives, and how an operator changes it there."""

    kind: str
    directory: Path
    monkeypatch: pytest.MonkeyPatch
    password: dict[str, str] = field(init=False)
    daemon: dict[str, str] = field(init=False, default_factory=dict)
    path: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.kind == "file":
            (self.directory / "secrets").mkdir()
            self.path = self.directory / "secrets" / "pop.txt"
            self.password = {"file": "secrets/pop.txt"}  # relative to the config file
        elif self.kind == "credential":
            creds = self.directory / "credentials"
            creds.mkdir()
            self.monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
            self.path = creds / "pop3_alice-pop"
            self.password = {"credential": "pop3_alice-pop"}
        else:
            self.path = self.directory / "mailingest.env"
            self.password = {"env": "ALICE_POP_PASSWORD"}
            self.daemon = {"env_file": "mailingest.env"}
            self.monkeypatch.setenv("ALICE_POP_PASSWORD", STALE)

    def write(self, value: str) -> None:
        """Change the secret as an operator would: rewrite the file in place."""
        if self.kind == "env_file":
            text = f"# mailingest secrets\nOTHER=x\n\nexport ALICE_POP_PASSWORD='{value}'\n"
        else:
            text = value + "\n"
        self.path.write_text(text, encoding="utf-8")
        self.path.chmod(0o600)


SOURCES = ("file", "credential", "env_file")


def _config(tmp_path: Path, port: int, source: Source) -> Path:
    account = loopback_account(port, name="a", username="u", password=source.password)
    return write_config(tmp_path, [account], daemon={**DAEMON, **source.daemon})


async def _status(config: Path) -> dict[str, Any]:
    [row] = await commands.status(load_config(config))
    return row


@pytest.mark.parametrize("kind", SOURCES)
async def test_a_paused_account_resumes_when_its_secret_changed_at_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    source = Source(kind, tmp_path, monkeypatch)
    source.write(WRONG)
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1), make_message(2)])])
    async with server:
        config = _config(tmp_path, server.port, source)
        daemon = Daemon(load_config(config), config, backoff=FAST)
        with capture() as logs:
            async with running(daemon):
                await until(lambda: bool(events(logs, "account_paused", "a")), "the pause")
                await asyncio.sleep(1.0)  # two poll intervals: no login may come
                assert server.login_attempts == 1
                # The same secret written again (a new mtime, the same value): still paused.
                source.write(WRONG)
                daemon.reload()
                await until(lambda: bool(events(logs, "config_reloaded")), "the first reload")
                assert events(logs, "config_reloaded")[0]["changed"] == []
                await asyncio.sleep(1.0)
                assert server.login_attempts == 1
                assert (await _status(config))["paused"] is True
                # The fix arrives at the source, the config file untouched: a reload brings it.
                source.write(PASSWORD)
                daemon.reload()
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
    assert server.login_attempts - server.sessions == 1  # one rejected login, ever
    assert [e["event"] for e in logs if e["event"].startswith("account_")] == [
        "account_paused",
        "account_resumed",
    ]
    assert events(logs, "account_paused")[0]["reason"] == "auth_failed"
    assert events(logs, "account_resumed", "a")[0]["reason"] == "credentials_changed"
    assert events(logs, "config_reloaded")[-1]["changed"] == ["a"]
    row = await _status(config)
    assert (row["paused"], row["pause_reason"], row["stored"]) == (False, None, 2)
    for secret in (PASSWORD, WRONG, STALE):
        assert secret not in repr(logs)


async def test_an_env_file_broken_on_reload_keeps_the_running_config_and_the_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Source("env_file", tmp_path, monkeypatch)
    source.write(WRONG)
    server = Pop3TestServer([Mailbox("u", PASSWORD, [make_message(1)])])
    async with server:
        config = _config(tmp_path, server.port, source)
        daemon = Daemon(load_config(config), config, backoff=FAST)
        with capture() as logs:
            async with running(daemon):
                await until(lambda: bool(events(logs, "account_paused", "a")), "the pause")
                # Half-edited: the closing quote is missing.
                source.path.write_text(f"ALICE_POP_PASSWORD='{PASSWORD}\n", encoding="utf-8")
                daemon.reload()
                await until(lambda: bool(events(logs, "config_rejected")), "the rejection")
                await asyncio.sleep(1.0)
                assert server.login_attempts == 1
                source.write(PASSWORD)
                daemon.reload()
                await until(lambda: bool(events(logs, "poll_completed", "a")), "a good poll")
    [rejected] = events(logs, "config_rejected")
    assert "daemon.env_file" in rejected["error"] and "line 1" in rejected["error"]
    assert PASSWORD not in rejected["error"]
    assert events(logs, "account_resumed", "a")[0]["reason"] == "credentials_changed"
    assert server.login_attempts - server.sessions == 1
    assert (await _status(config))["stored"] == 1


def test_sighup_to_the_daemon_process_brings_each_source_s_new_secret(tmp_path: Path) -> None:
    """`mailingest run` as systemd runs it: three accounts, one per source, all paused; the
    secrets change at their sources and one SIGHUP (`systemctl reload`) resumes them all."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (tmp_path / "pop.txt").write_text(WRONG + "\n")
    (creds / "pop3_cred").write_text(WRONG + "\n")
    env_file = tmp_path / "mailingest.env"
    env_file.write_text(f'ENV_PW="{WRONG}"\n')
    env_file.chmod(0o600)
    sources = {"file": {"file": "pop.txt"}, "cred": {"credential": "pop3_cred"}}
    sources["env"] = {"env": "ENV_PW"}
    boxes = [Mailbox(name, PASSWORD, [make_message(i)]) for i, name in enumerate(sources)]
    settings = {**DAEMON, "log_format": "json", "env_file": str(env_file)}
    with ThreadedPop3Server(boxes) as server:
        accounts = [
            loopback_account(server.port, name=name, username=name, password=password)
            for name, password in sources.items()
        ]
        config = write_config(tmp_path, accounts, daemon=settings)
        env = {"CREDENTIALS_DIRECTORY": str(creds), "ENV_PW": STALE}
        with DaemonProcess(config, env) as daemon:
            for name in sources:
                daemon.wait_event("account_paused", account=name)
            pop3 = server.server
            assert (pop3.login_attempts, pop3.sessions) == (3, 0)
            (tmp_path / "pop.txt").write_text(PASSWORD + "\n")
            (creds / "pop3_cred").write_text(PASSWORD + "\n")
            env_file.write_text(f"ENV_PW={PASSWORD}\n")
            daemon.send(signal.SIGHUP)
            for name in sources:
                daemon.wait_event("poll_completed", account=name)
            assert pop3.login_attempts - pop3.sessions == 3  # no other login was rejected
            code, _ = daemon.stop()
            assert code == 0, daemon.text()
            resumed = daemon.events("account_resumed")
            assert sorted(e["account"] for e in resumed) == sorted(sources)
            assert {e["reason"] for e in resumed} == {"credentials_changed"}
            assert sorted(daemon.events("config_reloaded")[0]["changed"]) == sorted(sources)
            for secret in (PASSWORD, WRONG, STALE):
                assert secret not in daemon.text()
    rows = json.loads(run_cli(config, "status", "--json").stdout)["accounts"]
    assert {r["account"]: (r["paused"], r["stored"]) for r in rows} == {
        name: (False, 1) for name in sources
    }


# --- loading: nothing is cached between loads ------------------------------------------------


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("secrets", [True, False], ids=["read", "deferred"])
def test_every_load_reads_the_secret_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, secrets: bool
) -> None:
    """Also the deferred path (``Secret(resolver=...)``, commands that log in nowhere): a
    secret revealed once keeps its value, and the next load reads the source anew."""
    source = Source(kind, tmp_path, monkeypatch)
    source.write(WRONG)
    config = _config(tmp_path, 110, source)
    first = load_config(config, secrets=secrets).accounts[0].password
    assert first.reveal() == WRONG
    source.write(PASSWORD)
    second = load_config(config, secrets=secrets).accounts[0].password
    assert (first.reveal(), second.reveal()) == (WRONG, PASSWORD)
    assert first != second


def test_env_takes_a_name_from_the_env_file_first_then_from_the_environment(
    tmp_path: Path,
) -> None:
    (tmp_path / "mailingest.env").write_text("POP_A=from-the-file\n")
    (tmp_path / "mailingest.env").chmod(0o600)
    accounts = [
        loopback_account(110, name="a", username="a", password={"env": "POP_A"}),
        loopback_account(110, name="b", username="b", password={"env": "POP_B"}),
    ]
    config = write_config(tmp_path, accounts, daemon={"env_file": "mailingest.env"})
    loaded = load_config(config, {"POP_A": "from-the-environment", "POP_B": "only-here"})
    a, b = loaded.accounts
    assert (a.password.reveal(), b.password.reveal()) == ("from-the-file", "only-here")
    assert (a.password.source, a.password.ref) == ("env", "POP_A")
    assert loaded.daemon.env_file == tmp_path / "mailingest.env"
    with pytest.raises(ConfigError) as info:
        load_config(config, {"POP_A": "from-the-environment"})
    assert info.value.key_path == 'accounts[1] ("b").password'
    assert "POP_B is neither in daemon.env_file" in str(info.value)


# --- the env file's format ------------------------------------------------------------------


def test_env_file_format() -> None:
    text = (
        "# a comment\n"
        "   # an indented comment\n"
        "\n"
        "PLAIN=plain-value\n"
        "export EXPORTED=exported\n"
        "export\tTABBED=tabbed\n"
        "SINGLE=' spaces # and a hash kept '\n"
        'DOUBLE="it\'s $HOME `cmd` \\n as is"\n'
        "  SPACED  =  spaced out  \n"
        "EMPTY=\n"
        "EQUALS=a=b==\n"
        "HASH=x#y\n"
        "QUOTED_INSIDE=a'b\"c\n"
        "LATER=first\n"
        "LATER=second\r\n"
        "UNICODE=pässwörd\x0cform-feed"
    )
    assert parse_env(text) == {
        "PLAIN": "plain-value",
        "EXPORTED": "exported",
        "TABBED": "tabbed",
        "SINGLE": " spaces # and a hash kept ",
        "DOUBLE": "it's $HOME `cmd` \\n as is",
        "SPACED": "spaced out",
        "EMPTY": "",
        "EQUALS": "a=b==",
        "HASH": "x#y",
        "QUOTED_INSIDE": "a'b\"c",
        "LATER": "second",
        "UNICODE": "pässwörd\x0cform-feed",
    }
    assert parse_env("") == {} and parse_env("\n\n# only comments\n") == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("A=1\nsecret-value-no-equals\n", "line 2 is not NAME=value"),
        ("A=1\n\n1ABC=secret-value\n", "line 3 is not NAME=value"),
        ("MY-PW=secret-value\n", "line 1 is not NAME=value"),
        ("=secret-value\n", "line 1 is not NAME=value"),
        ("export =secret-value\n", "line 1 is not NAME=value"),
        ("PW='secret-value\n", "line 1: the value of PW has no closing '"),
        ("PW=\"secret-value'\n", 'line 1: the value of PW has no closing "'),
        ('PW="\n', 'line 1: the value of PW has no closing "'),
        ("PW='secret-value' # a comment\n", "line 1: the value of PW has no closing '"),
    ],
)
def test_env_file_errors_name_the_line_never_the_value(text: str, problem: str) -> None:
    with pytest.raises(EnvFileError) as info:
        parse_env(text)
    assert problem in str(info.value)
    assert "secret-value" not in str(info.value)


def _env_config(tmp_path: Path, env_file: object = "mailingest.env") -> Path:
    account = loopback_account(110, name="a", username="a", password={"env": "POP_PW"})
    return write_config(tmp_path, [account], daemon={"env_file": env_file})


def _write_env(tmp_path: Path, data: bytes, mode: int = 0o600) -> None:
    path = tmp_path / "mailingest.env"
    path.write_bytes(data)
    path.chmod(mode)


#: The file itself: every command reads it (it is part of the configuration), `config` too.
ENV_FILE_ERRORS: list[tuple[Callable[[Path], None], str]] = [
    (lambda d: None, "cannot read"),  # no such file
    (lambda d: (d / "mailingest.env").mkdir(), "Is a directory"),
    (lambda d: _write_env(d, b"POP_PW=secret-value\nnot an assignment\n"), "line 2 is not"),
    (lambda d: _write_env(d, b"POP_PW='secret-value\n"), "no closing '"),
    (lambda d: _write_env(d, b"POP_PW=secret-value\n", 0o640), "chmod 600"),
    (lambda d: _write_env(d, b"POP_PW=secret-value\n", 0o604), "mode 604"),
    (lambda d: _write_env(d, b"A=1\nPOP_PW=secret-\xff-value\n"), "not valid UTF-8 (line 2)"),
]


@pytest.mark.parametrize(("make", "problem"), ENV_FILE_ERRORS)
def test_env_file_errors_exit_78_naming_the_key(
    tmp_path: Path, make: Callable[[Path], None], problem: str
) -> None:
    make(tmp_path)
    config = _env_config(tmp_path)
    proc = run_cli(config, "config", env={"POP_PW": "secret-value-env"})
    stderr = proc.stderr.decode()
    assert proc.returncode == 78, stderr
    assert f"{config}: daemon.env_file: " in stderr, stderr
    assert problem in stderr, stderr
    assert "secret-value" not in stderr + proc.stdout.decode()


#: A value it holds (or lacks): found when the password is read, by the commands that log in.
SECRET_ERRORS = [
    (b"POP_PW=secret-value\rPASS x\n", "contains a line break"),
    (b"OTHER=secret-value\n", "POP_PW is neither in daemon.env_file"),
    (b"POP_PW=\n", "is empty"),
]


@pytest.mark.parametrize(("data", "problem"), SECRET_ERRORS)
def test_a_bad_value_in_the_env_file_exits_78_naming_the_password(
    tmp_path: Path, data: bytes, problem: str
) -> None:
    _write_env(tmp_path, data)
    config = _env_config(tmp_path)
    assert run_cli(config, "config").returncode == 0  # reads the file, resolves no password
    proc = run_cli(config, "fetch")
    stderr = proc.stderr.decode()
    assert proc.returncode == 78, stderr
    assert '("a").password: ' in stderr and problem in stderr, stderr
    assert "secret-value" not in stderr + proc.stdout.decode()


def test_env_file_must_be_a_string(tmp_path: Path) -> None:
    proc = run_cli(_env_config(tmp_path, 5), "config")
    assert proc.returncode == 78
    assert "daemon.env_file: expected a string, got an integer" in proc.stderr.decode()


def test_config_shows_the_env_file_under_daemon_and_no_value(tmp_path: Path) -> None:
    _write_env(tmp_path, b"POP_PW=secret-value\n")
    proc = run_cli(_env_config(tmp_path), "config")
    assert proc.returncode == 0, proc.stderr.decode()
    rendered = proc.stdout.decode()
    data = tomllib.loads(rendered)
    assert data["daemon"]["env_file"] == str(tmp_path / "mailingest.env")
    assert data["accounts"][0]["password"] == {"env": "POP_PW"}
    assert "secret-value" not in rendered
    unset = write_config(tmp_path, [], daemon={"poll_interval": "1m"})
    rendered = run_cli(unset, "config").stdout.decode()
    assert "env_file" not in tomllib.loads(rendered)["daemon"]
    assert "# env_file: not set ({ env } secrets come from the process environment only)" in (
        rendered
    )

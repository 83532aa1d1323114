"""Config loading: every validation rule, the four secret sources, rendering, the example."""

from __future__ import annotations

import dataclasses
import shutil
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailingest.config import (
    DEFAULT_CONFIG_PATH,
    Account,
    Config,
    DaemonSettings,
    Secret,
    SmtpSettings,
    StorageSettings,
    load_config,
    parse_duration,
    resolve_config_path,
)
from mailingest.config_auth import OAuth2Config
from mailingest.config_render import render_config
from mailingest.errors import ConfigError
from support import ROOT

POA_PW = "hunter2-pop-secret"
SMTA_PW = "hunter2-smtp-secret"
ENV = {"A_PW": POA_PW, "S_PW": SMTA_PW}
EXAMPLE = ROOT / "config" / "mailingest.example.toml"

BASE = {
    "name": '"a"',
    "owner": '"alice"',
    "host": '"pop.example.com"',
    "username": '"alice@example.com"',
    "password": '{ env = "A_PW" }',
}
SMTP = """
[accounts.smtp]
host = "smtp.example.com"
username = "alice@example.com"
password = { env = "S_PW" }
"""


def acct(tables: str = "", **keys: str | None) -> str:
    """One [[accounts]] entry: BASE keys overridden by raw TOML values (None drops a key)."""
    fields = {**BASE, **keys}
    body = "\n".join(f"{key} = {value}" for key, value in fields.items() if value is not None)
    return f"\n[[accounts]]\n{body}\n{tables}"


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "mailingest.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), ENV if environ is None else environ)


def fails(
    tmp_path: Path, text: str, environ: dict[str, str] | None = None, mode: int = 0o600
) -> ConfigError:
    path = write(tmp_path, text, mode)
    with pytest.raises(ConfigError) as info:
        load_config(path, ENV if environ is None else environ)
    err = info.value
    assert err.exit_code == 78
    assert str(path) in str(err)
    for secret in (POA_PW, SMTA_PW, "pw-in-file", "literal-pw"):
        assert secret not in str(err)
    return err


A = 'accounts[0] ("a")'
SMTP_A = f"{A}.smtp"
SIX = '["a.example", "b.example", "c.example", "d.example", "e.example", "f.example"]'

ERROR_CASES = [
    # unknown keys, everywhere
    ("bogus = 1\n" + acct(), "bogus", "unknown key; allowed keys: accounts, api, daemon, storage"),
    ('[storage]\npath = "x"\n', "storage.path", "allowed keys: database"),
    # storage: a PostgreSQL URL never holds its password; only PostgreSQL takes one
    (
        '[storage]\ndatabase = "postgresql://u:literal-pw@db.example/mail"\n',
        "storage.database",
        "the URL holds a password; move it to storage.password",
    ),
    (
        '[storage]\ndatabase = "postgresql://u@db.example/mail?password=literal-pw"\n',
        "storage.database",
        "the URL holds a password",
    ),
    (
        '[storage]\ndatabase = "mail.db"\npassword = { env = "A_PW" }\n',
        "storage.password",
        "only a postgresql:// database takes a password",
    ),
    (
        '[storage]\ndatabase = "postgresql://u@db.example/mail"\npassword = { env = "NOPE" }\n',
        "storage.password",
        "environment variable NOPE is not set",
    ),
    ("[daemon]\nworkers = 2\n", "daemon.workers", "allowed keys: env_file, log_format, max_"),
    ('[daemon]\nenv_file = "absent.env"\n', "daemon.env_file", "cannot read"),
    (acct(pasword='"x"'), f"{A}.pasword", "allowed keys: aliases, allow_plaintext, auth, ca_file"),
    (acct(SMTP + "foo = 1\n"), f"{SMTP_A}.foo", "allowed keys: allow_plaintext, auth, ca_file"),
    (acct(password='{ vault = "x" }'), f"{A}.password.vault", "allowed keys: credential, env"),
    # table shapes
    ("storage = 1\n", "storage", "expected a table"),
    ("accounts = 1\n", "accounts", "expected an array of tables"),
    ("accounts = [1]\n", "accounts[0]", "expected a table ([[accounts]]), got an integer"),
    (acct(smtp="1"), f"{A}.smtp", "expected a table"),
    # types: bool is not an int
    (acct(port="true"), f"{A}.port", "expected an integer 1\u201365535, got a boolean"),
    (acct(port='"995"'), f"{A}.port", "got a string"),
    (acct(host="1"), f"{A}.host", "expected a string, got an integer"),
    (acct(leave_on_server='"no"'), f"{A}.leave_on_server", "expected true or false"),
    (acct(delete_after_days="1.5"), f"{A}.delete_after_days", "got a float"),
    (acct(password="12345"), f"{A}.password", "expected a string or"),
    (acct(excluded_domains='"x.example"'), f"{A}.excluded_domains", "expected an array"),
    ("[daemon]\nmax_concurrent = true\n", "daemon.max_concurrent", "got a boolean"),
    # missing required keys
    (acct(name=None), "accounts[0].name", "missing required key"),
    (acct(owner=None), f"{A}.owner", "missing required key"),
    (acct(host=None), f"{A}.host", "missing required key"),
    (acct(username=None), f"{A}.username", "missing required key"),
    (acct(password=None), f"{A}.password", "missing required key"),
    (acct(SMTP.replace('host = "smtp.example.com"', "")), f"{SMTP_A}.host", "missing required"),
    (acct(SMTP.replace('username = "alice@example.com"', "")), f"{SMTP_A}.username", "missing"),
    (acct(SMTP.replace('password = { env = "S_PW" }', "")), f"{SMTP_A}.password", "missing"),
    # names
    (acct() + acct(), 'accounts[1] ("a").name', "duplicate account name"),
    (acct(name='"a b"'), "accounts[0].name", "expected letters, digits and . _ @ - only"),
    (acct(name='""'), "accounts[0].name", "must not be empty"),
    # security and ports
    (acct(security='"ssl"'), f"{A}.security", "expected one of tls, starttls, plain"),
    (acct(security='"plain"'), f"{A}.security", "set allow_plaintext = true"),
    (acct(SMTP + 'security = "plain"\n'), f"{SMTP_A}.security", "set allow_plaintext = true"),
    (acct(port="0"), f"{A}.port", "expected an integer 1\u201365535, got 0"),
    (acct(port="65536"), f"{A}.port", "expected an integer 1\u201365535, got 65536"),
    (acct(SMTP + "port = 0\n"), f"{SMTP_A}.port", "expected an integer 1\u201365535, got 0"),
    (acct(SMTP + "daily_limit = 0\n"), f"{SMTP_A}.daily_limit", "expected an integer >= 1"),
    # Gmail recent: mode never deletes
    (
        acct(username='"recent:alice@gmail.com"', leave_on_server="false"),
        f"{A}.leave_on_server",
        "Gmail recent: mode returns the last 30 days to every client; deleting there removes "
        "mail other clients still expect",
    ),
    (acct(username='"recent:"'), f"{A}.username", 'expected "recent:" followed by'),
    (acct(username='"a\\r\\nDELE 1"'), f"{A}.username", "contains a line break"),
    # sharing
    (acct(sharing='"team"'), f"{A}.sharing", "expected one of private, custom, public"),
    (acct(excluded_domains='["x.example"]'), f"{A}.excluded_domains", "only applies with"),
    (acct(sharing='"public"', excluded_domains=SIX), f"{A}.excluded_domains", "at most 5, got 6"),
    (
        acct(sharing='"public"', excluded_domains='["x.example", "not a domain"]'),
        f"{A}.excluded_domains[1]",
        "expected a domain like x.example",
    ),
    (acct(sharing='"public"', excluded_domains="[1]"), f"{A}.excluded_domains[0]", "a string"),
    (acct(sharing='"public"', excluded_domains='["localhost"]'), "domains[0]", "a domain like"),
    (acct(primary="true") + acct(name='"b"', primary="true"), 'accounts[1] ("b").primary', "one"),
    (acct(from_address='"nobody"'), f"{A}.from_address", "expected an address"),
    # numbers and durations
    (acct(delete_after_days="-1"), f"{A}.delete_after_days", "expected an integer >= 0, got -1"),
    ("[daemon]\nmax_concurrent = 0\n", "daemon.max_concurrent", "expected an integer >= 1, got 0"),
    ("[daemon]\nmax_sessions_per_cycle = 0\n", "daemon.max_sessions_per_cycle", ">= 1, got 0"),
    ('[daemon]\nlog_format = "xml"\n', "daemon.log_format", "expected one of auto, json, console"),
    ('[daemon]\npoll_interval = "5 min"\n', "daemon.poll_interval", "expected a duration"),
    ("[daemon]\npoll_interval = 0\n", "daemon.poll_interval", "greater than zero"),
    ("[daemon]\nshutdown_timeout = -1\n", "daemon.shutdown_timeout", "expected a duration"),
    ("[daemon]\nshutdown_timeout = true\n", "daemon.shutdown_timeout", "got a boolean"),
    (acct(timeout='"0s"'), f"{A}.timeout", "greater than zero"),
    (acct(poll_interval='"soon"'), f"{A}.poll_interval", "expected a duration"),
    (acct(SMTP + 'timeout = "x"\n'), f"{SMTP_A}.timeout", "expected a duration"),
    # paths
    (acct(ca_file='"missing.pem"'), f"{A}.ca_file", "does not exist"),
    (acct(SMTP + 'ca_file = "missing.pem"\n'), f"{SMTP_A}.ca_file", "does not exist"),
    ('[storage]\ndatabase = ""\n', "storage.database", "must not be empty"),
    # secrets (never shown)
    (acct(password='{ env = "A_PW", file = "p" }'), f"{A}.password", "exactly one of env"),
    (acct(password="{}"), f"{A}.password", "exactly one of env, file, credential"),
    (acct(password='{ env = "" }'), f"{A}.password.env", "must not be empty"),
    (acct(password='{ env = "NOPE" }'), f"{A}.password", "environment variable NOPE is not set"),
    (acct(password='{ file = "absent.txt" }'), f"{A}.password", "cannot read file"),
    (acct(password='{ credential = "pop" }'), f"{A}.password", "needs $CREDENTIALS_DIRECTORY"),
    (acct(SMTP.replace('{ env = "S_PW" }', '{ env = "NOPE" }')), f"{SMTP_A}.password", "NOPE"),
]


@pytest.mark.parametrize(("text", "key_path", "problem"), ERROR_CASES)
def test_invalid_config_names_key_path_and_problem(
    tmp_path: Path, text: str, key_path: str, problem: str
) -> None:
    err = fails(tmp_path, text)
    assert err.key_path is not None
    assert key_path in err.key_path
    assert key_path in str(err)
    assert problem in str(err)


def test_missing_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", {})
    assert str(tmp_path / "nope.toml") in str(info.value)
    assert "not found" in str(info.value)
    assert info.value.exit_code == 78


def test_unreadable_file_names_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(tmp_path, {})  # a directory
    assert info.value.file == str(tmp_path)


def test_toml_syntax_error_gives_line(tmp_path: Path) -> None:
    err = fails(tmp_path, '[daemon]\nlog_format = "json"\nmax_concurrent = = 3\n')
    assert "invalid TOML" in str(err)
    assert "line 3" in str(err)


def test_non_utf8_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mailingest.toml"
    path.write_bytes(b'[daemon]\nlog_format = "\xff"\n')
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path, {})


def test_minimal_account_gets_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, acct())
    account = config.accounts[0]
    assert account == Account(
        name="a",
        owner="alice",
        host="pop.example.com",
        port=995,
        security="tls",
        username="alice@example.com",
        password=Secret("env", "A_PW", POA_PW),
    )
    assert (account.leave_on_server, account.delete_after_days, account.sharing) == (
        True,
        0,
        "private",
    )
    assert account.timeout == 60.0
    assert account.poll_interval is None
    assert account.smtp is None
    assert config.daemon == DaemonSettings(300.0, 16, 10, "auto", 10.0)
    assert config.storage.database == tmp_path / "mail.db"
    assert config.path == tmp_path / "mailingest.toml"
    assert config.account("a") is account
    with pytest.raises(KeyError):
        config.account("b")


def test_empty_file_is_a_valid_config_without_accounts(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.accounts == ()


def test_database_defaults_to_state_directory(tmp_path: Path) -> None:
    config = load(tmp_path, acct(), {**ENV, "STATE_DIRECTORY": "/var/lib/mailingest"})
    assert config.storage.database == Path("/var/lib/mailingest/mail.db")


def test_relative_paths_resolve_against_config_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    text = '[storage]\ndatabase = "data/../db/mail.db"\n' + acct(ca_file='"ca.pem"')
    config = load(tmp_path, text, {**ENV, "STATE_DIRECTORY": "/elsewhere"})
    assert config.storage.database == tmp_path / "db" / "mail.db"
    assert config.accounts[0].ca_file == tmp_path / "ca.pem"


def test_empty_ca_file_means_system_store_and_tls_verify_false_is_allowed(tmp_path: Path) -> None:
    account = load(tmp_path, acct(ca_file='""', tls_verify="false")).accounts[0]
    assert account.ca_file is None
    assert account.tls_verify is False


@pytest.mark.parametrize(
    ("security", "pop3_port", "smtp_port"),
    [("tls", 995, 465), ("starttls", 110, 587), ("plain", 110, 25)],
)
def test_default_ports_follow_security(
    tmp_path: Path, security: str, pop3_port: int, smtp_port: int
) -> None:
    smtp = SMTP + f'security = "{security}"\nallow_plaintext = true\n'
    account = load(tmp_path, acct(smtp, security=f'"{security}"', allow_plaintext="true"))
    assert account.accounts[0].port == pop3_port
    assert account.accounts[0].allow_plaintext is True
    assert account.accounts[0].smtp is not None
    assert account.accounts[0].smtp.port == smtp_port


def test_smtp_defaults_and_explicit_values(tmp_path: Path) -> None:
    config = load(tmp_path, acct(SMTP + 'daily_limit = 500\ntimeout = "30s"\n'))
    smtp = config.accounts[0].smtp
    assert smtp is not None
    assert (smtp.security, smtp.port, smtp.daily_limit, smtp.timeout) == ("starttls", 587, 500, 30)
    assert smtp.password.reveal() == SMTA_PW
    assert (smtp.allow_plaintext, smtp.ca_file, smtp.tls_verify) == (False, None, True)


def test_account_options(tmp_path: Path) -> None:
    text = acct(
        port="1995",
        poll_interval='"2m"',
        timeout="15",
        sharing='"public"',
        excluded_domains='[" @Partner.EXAMPLE ", "x.example", "X.example", "bücher.example"]',
        magnet_label='"CRM"',
        from_address='"alice@crm.example"',
        primary="true",
        delete_after_days="30",
    )
    account = load(tmp_path, text).accounts[0]
    assert account.port == 1995
    assert account.poll_interval == 120.0
    assert account.timeout == 15.0
    assert account.excluded_domains == ("partner.example", "x.example", "bücher.example")
    assert (account.magnet_label, account.from_address) == ("CRM", "alice@crm.example")
    assert (account.primary, account.delete_after_days) == (True, 30)


def test_empty_magnet_label_and_from_address_are_unset(tmp_path: Path) -> None:
    account = load(tmp_path, acct(magnet_label='""', from_address='""')).accounts[0]
    assert account.magnet_label is None
    assert account.from_address is None


def test_recent_username_keeps_login_and_exposes_identity(tmp_path: Path) -> None:
    account = load(tmp_path, acct(username='"recent:Alice@Gmail.com"')).accounts[0]
    assert account.username == "recent:Alice@Gmail.com"
    assert account.recent_mode is True
    assert account.identity == "alice@gmail.com"
    plain = load(tmp_path, acct(username='"Bob@Example.com"')).accounts[0]
    assert (plain.recent_mode, plain.identity) == (False, "bob@example.com")


def test_normal_username_may_delete(tmp_path: Path) -> None:
    assert load(tmp_path, acct(leave_on_server="false")).accounts[0].leave_on_server is False


def test_two_owners_may_each_have_a_primary_account(tmp_path: Path) -> None:
    text = acct(primary="true") + acct(name='"b"', owner='"bob"', primary="true")
    assert [a.primary for a in load(tmp_path, text).accounts] == [True, True]


# --- secrets ---------------------------------------------------------------------------------


def test_literal_secret(tmp_path: Path) -> None:
    secret = load(tmp_path, acct(password='"literal-pw"')).accounts[0].password
    assert (secret.source, secret.ref, secret.reveal()) == ("literal", "", "literal-pw")
    assert secret.describe() == '"***"'


def test_env_secret(tmp_path: Path) -> None:
    secret = load(tmp_path, acct()).accounts[0].password
    assert (secret.source, secret.ref, secret.reveal()) == ("env", "A_PW", POA_PW)
    assert secret.describe() == '{ env = "A_PW" }'


@pytest.mark.parametrize("content", ["pw-in-file", "pw-in-file\n", "pw-in-file\r\n"])
def test_file_secret_relative_to_config_strips_one_newline(tmp_path: Path, content: str) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pop.txt").write_bytes(content.encode())
    secret = load(tmp_path, acct(password='{ file = "secrets/pop.txt" }')).accounts[0].password
    assert (secret.source, secret.reveal()) == ("file", "pw-in-file")
    assert secret.ref == str(tmp_path / "secrets" / "pop.txt")
    assert secret.describe() == f'{{ file = "{tmp_path / "secrets" / "pop.txt"}" }}'


@pytest.mark.parametrize("content", ["pw-in-file\n", "pw-in-file\r\n"])
def test_credential_secret_strips_one_newline(tmp_path: Path, content: str) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "alice-pop").write_bytes(content.encode())
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    secret = load(tmp_path, acct(password='{ credential = "alice-pop" }'), environ)
    password = secret.accounts[0].password
    assert (password.source, password.ref, password.reveal()) == (
        "credential",
        "alice-pop",
        "pw-in-file",
    )
    assert password.describe() == '{ credential = "alice-pop" }'


def test_missing_credential_file_is_named(tmp_path: Path) -> None:
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    err = fails(tmp_path, acct(password='{ credential = "alice-pop" }'), environ)
    assert f"{A}.password" in str(err)
    assert "alice-pop" in str(err)


def test_credential_name_may_not_be_a_path(tmp_path: Path) -> None:
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    err = fails(tmp_path, acct(password='{ credential = "../mailingest.toml" }'), environ)
    assert "without '/'" in str(err)


@pytest.mark.parametrize(
    "value", ["pw\r\nPASS x", "pw\nx", "pw\r", "hunter2-pop-secret\n"], ids=repr
)
def test_secret_with_line_break_is_refused(tmp_path: Path, value: str) -> None:
    err = fails(tmp_path, acct(), {"A_PW": value})
    assert f"{A}.password" in str(err)
    assert "contains a line break; POP3 servers such as Gmail answer +OK" in str(err)
    assert value not in str(err)


def test_file_secret_strips_only_one_newline(tmp_path: Path) -> None:
    (tmp_path / "pw.txt").write_text("pw-in-file\n\n")
    err = fails(tmp_path, acct(password='{ file = "pw.txt" }'))
    assert "contains a line break" in str(err)


@pytest.mark.parametrize("environ", [{"A_PW": ""}, {"A_PW": "a\0b"}], ids=["empty", "nul"])
def test_empty_or_nul_secret_is_refused(tmp_path: Path, environ: dict[str, str]) -> None:
    err = fails(tmp_path, acct(), environ)
    assert f"{A}.password" in str(err)
    assert "is empty" in str(err) or "NUL" in str(err)


def test_empty_literal_password_is_refused(tmp_path: Path) -> None:
    assert "is empty" in str(fails(tmp_path, acct(password='""')))


@pytest.mark.parametrize(
    ("password", "environ", "value"),
    [('{ env = "A_PW" }', {"A_PW": "7"}, "7"), ('"ab"', {}, "ab")],
    ids=["one-digit", "literal"],
)
def test_a_secret_too_short_for_the_log_mask_is_accepted(
    tmp_path: Path, password: str, environ: dict[str, str], value: str
) -> None:
    """The server decides what a password may be: one too short for the log mask (which
    would hide those characters in every line) is still read, as is."""
    config = load(tmp_path, acct(password=password), environ)
    assert config.accounts[0].password.reveal() == value


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_group_readable_file_with_literal_password_is_refused(tmp_path: Path, mode: int) -> None:
    err = fails(tmp_path, acct(password='"literal-pw"'), mode=mode)
    assert err.file == str(tmp_path / "mailingest.toml")
    assert "holds a literal password" in str(err)
    assert "is readable by group/others" in str(err)
    assert "chmod 600 it or use { env = ... }" in str(err)


def test_group_readable_file_with_literal_smtp_password_is_refused(tmp_path: Path) -> None:
    smtp = SMTP.replace('{ env = "S_PW" }', '"literal-pw"')
    err = fails(tmp_path, acct(smtp), mode=0o644)
    assert "holds a literal password" in str(err)
    assert SMTP_A in str(err)


def test_group_readable_file_without_literal_password_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, acct(SMTP), mode=0o644), ENV)
    assert config.accounts[0].password.reveal() == POA_PW


def test_secret_never_appears_in_repr_or_str(tmp_path: Path) -> None:
    config = load(tmp_path, acct(SMTP))
    for text in (repr(config), str(config), repr(config.accounts[0].password)):
        assert POA_PW not in text
        assert SMTA_PW not in text
    assert repr(Secret("literal", "", "x")) == str(Secret("literal", "", "x")) == "'***'"


# --- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        (" 1.5s ", 1.5),
        ("300", 300),
        ("2.5", 2.5),
        (45, 45),
        (0.25, 0.25),
        ("0s", 0),
    ],
)
def test_parse_duration(value: str | int | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "m", "5 m", "5min", "1m1h", "1m1m", "-5s", "1e3", "nan", -1, True, "5M"]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match="expected a duration") as info:
        parse_duration(value, key_path="daemon.poll_interval")  # type: ignore[arg-type]
    assert info.value.key_path == "daemon.poll_interval"
    assert info.value.exit_code == 78


def test_parse_duration_rejects_infinite() -> None:
    with pytest.raises(ConfigError):
        parse_duration(float("inf"))
    with pytest.raises(ConfigError):
        parse_duration(10**400)
    with pytest.raises(ConfigError):
        parse_duration("9" * 400 + "d")


@given(
    n=st.integers(min_value=0, max_value=10**9),
    unit=st.sampled_from([("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
)
def test_parse_duration_round_trips_units(n: int, unit: tuple[str, int]) -> None:
    suffix, size = unit
    assert parse_duration(f"{n}{suffix}") == n * size
    assert parse_duration(str(n)) == n


@given(h=st.integers(0, 1000), m=st.integers(0, 59), s=st.integers(0, 59))
def test_parse_duration_combines_units(h: int, m: int, s: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3600 + m * 60 + s


# --- config path -------------------------------------------------------------------------


def test_resolve_config_path_order() -> None:
    env = {"MAILINGEST_CONFIG": "/srv/mi.toml"}
    assert resolve_config_path("cli.toml", env) == Path("cli.toml")
    assert resolve_config_path(None, env) == Path("/srv/mi.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH
    assert resolve_config_path(None, {"MAILINGEST_CONFIG": ""}) == DEFAULT_CONFIG_PATH
    assert DEFAULT_CONFIG_PATH == Path("/etc/mailingest/mailingest.toml")


# --- rendering ---------------------------------------------------------------------------


def test_render_config_redacts_secrets_and_fills_defaults(tmp_path: Path) -> None:
    (tmp_path / "pw.txt").write_text("pw-in-file\n")
    text = acct(SMTP.replace('{ env = "S_PW" }', '{ file = "pw.txt" }')) + acct(
        name='"b"', password='"literal-pw"', username='"recent:bob@gmail.com"'
    )
    config = load(tmp_path, text)
    rendered = render_config(config)
    for secret in (POA_PW, "pw-in-file", "literal-pw"):
        assert secret not in rendered
    assert config.accounts[0].password.describe() in rendered
    assert '{ env = "A_PW" }' in rendered
    assert f'password = {{ file = "{tmp_path / "pw.txt"}" }}' in rendered
    assert 'password = "***"' in rendered
    data = tomllib.loads(rendered)
    assert data["daemon"] == {
        "poll_interval": "5m",
        "max_concurrent": 16,
        "max_sessions_per_cycle": 10,
        "log_format": "auto",
        "shutdown_timeout": "10s",
    }
    first = data["accounts"][0]
    assert (first["port"], first["security"], first["sharing"], first["timeout"]) == (
        995,
        "tls",
        "private",
        "1m",
    )
    assert first["smtp"]["port"] == 587
    assert first["excluded_domains"] == []
    assert "# poll_interval: not set" in rendered


def test_render_config_round_trips(tmp_path: Path) -> None:
    text = '[daemon]\npoll_interval = "1h30m"\nshutdown_timeout = 2.5\n' + acct(
        SMTP + "daily_limit = 100\n",
        poll_interval="90",
        sharing='"public"',
        excluded_domains='["x.example"]',
        username='"a\\"b@x.example"',
    )
    config = load(tmp_path, text)
    again = tmp_path / "again"
    again.mkdir()
    (again / "mailingest.toml").write_text(render_config(config))
    reloaded = load_config(again / "mailingest.toml", ENV)
    assert (reloaded.storage, reloaded.daemon, reloaded.accounts) == (
        config.storage,
        config.daemon,
        config.accounts,
    )


# --- the shipped example -----------------------------------------------------------------


def test_example_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "mailingest.toml"
    shutil.copy(EXAMPLE, path)
    path.chmod(0o600)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "bob-pop.txt").write_text("bob-pop-pw\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "bob-smtp").write_text("bob-smtp-pw\n")
    environ = {
        "ALICE_POP_PASSWORD": "alice-pop-pw",
        "ALICE_SMTP_PASSWORD": "alice-smtp-pw",
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    config = load_config(path, environ)
    alice, bob = config.accounts
    assert alice.recent_mode and alice.identity == "alice@gmail.com"
    assert alice.smtp is not None and alice.smtp.daily_limit == 500
    assert bob.password.reveal() == "bob-pop-pw"
    assert bob.excluded_domains == ("lawyers.example", "family.example")
    assert bob.port == 110
    assert bob.smtp is not None
    assert (bob.smtp.port, bob.smtp.password.reveal()) == (465, "bob-smtp-pw")
    rendered = render_config(config)
    assert "alice-pop-pw" not in rendered and "bob-smtp-pw" not in rendered


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    assert "[accounts.smtp]" in text
    for settings in (Account, SmtpSettings, DaemonSettings, StorageSettings, OAuth2Config):
        for key in (f.name for f in dataclasses.fields(settings) if f.name not in _SECTIONS):
            assert f"{key} =" in text, key


_SECTIONS = ("smtp", "seal_key")  # a table of its own; storage.secret_key


def test_postgresql_storage_keeps_the_url_and_describes_its_password(tmp_path: Path) -> None:
    text = (
        '[storage]\ndatabase = "postgresql://u@db.example:5433/mail"\npassword = { env = "A_PW" }\n'
    )
    config = load(tmp_path, text + acct())
    assert config.storage.database == "postgresql://u@db.example:5433/mail"
    assert config.storage.postgres and config.storage.reveal_password() == POA_PW
    assert POA_PW in set(config.secrets())
    rendered = render_config(config)
    assert 'password = { env = "A_PW" }' in rendered and POA_PW not in rendered

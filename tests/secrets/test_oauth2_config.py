"""The ``auth = { oauth2 = ... }`` key (issue 15): presets filled in, secrets from env, file
or credential and never shown, and every mistake a config error (78) naming its key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mailingest.config import Config, load_config
from mailingest.config_render import render_config
from mailingest.errors import ConfigError

SECRET = "client-secret-Rk18"
REFRESH = "refresh-token-Pw36"
SEAL = "storage-seal-key-0123456789abcdef"
ENV = {"CS": SECRET, "RT": REFRESH, "SEAL": SEAL}
PEM = "-----BEGIN PRIVATE KEY-----\nMIIB\nabcd\n-----END PRIVATE KEY-----\n"


def config_text(oauth2: str, *, seal: bool = True, extra: str = "", smtp: str = "") -> str:
    storage = '[storage]\nsecret_key = { env = "SEAL" }\n' if seal else ""
    return (
        f'{storage}\n[[accounts]]\nname = "a"\nowner = "alice"\n'
        f'host = "outlook.office365.com"\nusername = "alice@contoso.example"\n{extra}'
        f"[accounts.auth.oauth2]\n{oauth2}\n{smtp}"
    )


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mailingest.toml"
    path.write_text(text)
    path.chmod(0o600)
    return load_config(path, ENV)


MS = 'provider = "microsoft"\nclient_id = "app"\nrefresh_token = { env = "RT" }\n'


def test_microsoft_presets_fill_the_token_url_and_the_pop_scopes(tmp_path: Path) -> None:
    config = load(tmp_path, config_text(MS))
    [account] = config.accounts
    auth = account.auth
    assert account.password is None and auth.grant == "refresh_token"
    assert auth.token_url == ("https://login.microsoftonline.com/organizations/oauth2/v2.0/token")
    assert auth.scopes == ("https://outlook.office.com/POP.AccessAsUser.All", "offline_access")
    assert auth.refresh_token.reveal() == REFRESH and auth.mechanism == "auto"
    assert account.pop3_login().sasl == "auto"


def test_google_service_account_defaults_to_jwt_bearer_for_the_mailbox(tmp_path: Path) -> None:
    (tmp_path / "sa.pem").write_text(PEM)
    oauth2 = (
        'provider = "google"\nclient_id = "sa@proj.iam.example"\n'
        'private_key = { file = "sa.pem" }\n'
    )
    config = load(tmp_path, config_text(oauth2, seal=False))
    auth = config.accounts[0].auth
    assert (auth.grant, auth.subject) == ("jwt_bearer", "alice@contoso.example")
    assert auth.scopes == ("https://mail.google.com/",)
    assert auth.private_key.reveal() == PEM.removesuffix("\n")  # line breaks kept


def test_smtp_takes_its_own_oauth2_with_smtp_scopes(tmp_path: Path) -> None:
    smtp = (
        '[accounts.smtp]\nhost = "smtp.office365.com"\nusername = "alice@contoso.example"\n'
        '[accounts.smtp.auth.oauth2]\nprovider = "microsoft"\nclient_id = "app"\n'
    )
    config = load(tmp_path, config_text(MS, smtp=smtp))
    smtp_auth = config.accounts[0].smtp.auth
    assert smtp_auth.scopes == ("https://outlook.office.com/SMTP.Send", "offline_access")
    assert config.accounts[0].smtp.password is None


def test_the_effective_config_shows_where_secrets_come_from_never_what(tmp_path: Path) -> None:
    oauth2 = MS + 'client_secret = { env = "CS" }\n'
    config = load(tmp_path, config_text(oauth2))
    text = render_config(config)
    assert SECRET not in text and REFRESH not in text and SEAL not in text
    parsed = tomllib.loads(text)
    assert parsed["accounts"][0]["auth"]["oauth2"]["refresh_token"] == {"env": "RT"}
    assert "password" not in parsed["accounts"][0]


@pytest.mark.parametrize(
    ("oauth2", "extra", "seal", "key", "problem"),
    [
        ('provider = "yahoo"\nclient_id = "x"', "", True, "oauth2.provider", "expected one of"),
        ('client_id = "x"', "", True, "oauth2.provider", "missing required key"),
        (MS, 'password = { env = "RT" }\n', True, "password", "not used with auth"),
        (MS, "", False, "oauth2.grant", "secret_key"),
        (
            'provider = "microsoft"\ngrant = "client_credentials"\nclient_id = "x"\n'
            'client_secret = { env = "CS" }',
            "",
            True,
            "oauth2.tenant",
            "missing required key",
        ),
        (
            'provider = "microsoft"\ngrant = "client_credentials"\ntenant = "common"\n'
            'client_id = "x"\nclient_secret = { env = "CS" }',
            "",
            True,
            "oauth2.tenant",
            "app-only access needs your directory",
        ),
        (
            'provider = "microsoft"\ngrant = "client_credentials"\ntenant = "t.example"\n'
            'client_id = "x"',
            "",
            True,
            "oauth2.client_secret",
            "missing required key",
        ),
        ('provider = "custom"\nclient_id = "x"', "", True, "oauth2.token_url", "missing"),
        (
            'provider = "custom"\nclient_id = "x"\ntoken_url = "http://idp.example/t"',
            "",
            True,
            "oauth2.token_url",
            "https://",
        ),
        (MS + 'scopes = "pop"', "", True, "oauth2.scopes", "array of scope strings"),
        (MS + 'mechanism = "plain"', "", True, "oauth2.mechanism", "expected one of"),
        (MS + 'grnat = "x"', "", True, "oauth2.grnat", "did you mean grant"),
        (MS + 'refresh_token = { env = "NOPE" }', "", True, "refresh_token", ""),
        ('provider = "google"\nclient_id = "x"\ntenant = "t"', "", True, "oauth2.tenant", ""),
    ],
)
def test_mistakes_are_config_errors_naming_the_key(
    tmp_path: Path, oauth2: str, extra: str, seal: bool, key: str, problem: str
) -> None:
    if oauth2.count("refresh_token =") > 1:  # the duplicate-key case: a TOML error instead
        oauth2 = oauth2.replace('refresh_token = { env = "RT" }\n', "", 1)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, config_text(oauth2, seal=seal, extra=extra))
    err = caught.value
    assert err.exit_code == 78
    assert key in (err.key_path or ""), str(err)
    assert problem in str(err)
    for secret in (SECRET, REFRESH, SEAL):
        assert secret not in str(err)


def test_auth_must_be_password_or_an_oauth2_table(tmp_path: Path) -> None:
    text = (
        '[[accounts]]\nname = "a"\nowner = "o"\nhost = "h.example"\nusername = "u"\n'
        'password = "pw-a"\nauth = "kerberos"\n'
    )
    with pytest.raises(ConfigError, match='expected "password" or'):
        load(tmp_path, text)
    assert load(tmp_path, text.replace('"kerberos"', '"password"'))


def test_a_service_account_acts_for_the_mailbox_not_its_recent_login(tmp_path: Path) -> None:
    (tmp_path / "sa.pem").write_text(PEM)
    oauth2 = 'provider = "google"\nclient_id = "sa@p.example"\nprivate_key = { file = "sa.pem" }\n'
    text = config_text(oauth2, seal=False).replace(
        'username = "alice@contoso.example"', 'username = "recent:alice@contoso.example"'
    )
    auth = load(tmp_path, text).accounts[0].auth
    assert auth is not None and auth.subject == "alice@contoso.example"


@pytest.mark.parametrize(
    "url", ["http://127.evil.example/token", "http://localhost.evil.example/t", "ftp://x/t"]
)
def test_plain_http_only_to_this_machine(tmp_path: Path, url: str) -> None:
    oauth2 = f'provider = "custom"\nclient_id = "x"\nscopes = ["s"]\ntoken_url = "{url}"\n'
    with pytest.raises(ConfigError, match="expected an https:// URL"):
        load(tmp_path, config_text(oauth2 + 'refresh_token = { env = "RT" }'))


@pytest.mark.parametrize("change", ['subject = "bob@contoso.example"', 'mechanism = "xoauth2"'])
def test_another_subject_or_mechanism_is_another_login_for_the_pause(
    tmp_path: Path, change: str
) -> None:
    """A pause ends when the OAuth2 settings change: these count too."""
    (tmp_path / "sa.pem").write_text(PEM)
    oauth2 = 'provider = "google"\nclient_id = "sa@p.example"\nprivate_key = { file = "sa.pem" }\n'
    before = load(tmp_path, config_text(oauth2, seal=False)).accounts[0]
    after = load(tmp_path, config_text(oauth2 + change, seal=False)).accounts[0]
    assert before.login_bytes() != after.login_bytes()

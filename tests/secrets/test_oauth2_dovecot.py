"""OAuth2 sign-in end to end (issue 15): a real Dovecot that checks JWT access tokens itself
(``passdb { driver = oauth2 }``, local validation) and a loopback token endpoint; every run
goes through the CLI as a user runs it."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import jwt
import pytest

from daemon_support import DaemonProcess, wait_until
from dovecot import OAUTH2_ISSUER, Mailbox
from oauth2_support import (
    CLIENT_SECRET,
    REFRESH,
    SEAL,
    access_jwt,
    failed_token_logins,
    logins,
    oauth_config,
    sign_in_replies,
)
from support import fetch_json, run_cli, run_sql
from token_endpoint import Reply, token_endpoint


@pytest.mark.parametrize(
    ("mechanism", "expected"),
    [("auto", "XOAUTH2"), ("xoauth2", "XOAUTH2"), ("oauthbearer", "OAUTHBEARER")],
)
def test_fetch_signs_in_with_the_mechanism_chosen(
    tmp_path: Path, mailbox: Mailbox, mechanism: str, expected: str
) -> None:
    mailbox.deliver(b"Subject: one\r\n\r\nbody\r\n")
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
        config = oauth_config(tmp_path, mailbox, endpoint, mechanism=mechanism)
        code, out = fetch_json(config)
    assert code == 0, out
    assert out["accounts"][0]["status"] == "ok" and out["accounts"][0]["new"] == 1
    assert logins(mailbox) == [expected]
    assert endpoint.requests[0]["grant_type"] == "refresh_token"
    assert endpoint.requests[0]["refresh_token"] == REFRESH


def test_an_expired_token_is_refreshed_before_the_login(tmp_path: Path, mailbox: Mailbox) -> None:
    """Two polls in one process: the first token has expired by the second poll (Dovecot
    would refuse it), so a new one is requested first and no login fails."""
    import asyncio

    from mailingest.config import load_config
    from mailingest.fetch import fetch_account
    from mailingest.store import Store

    mailbox.deliver(b"Subject: one\r\n\r\nbody\r\n")
    with token_endpoint() as endpoint:
        first = endpoint.token(access_jwt(mailbox.user, lifetime=2), expires_in=2)
        endpoint.replies = [first, endpoint.token(access_jwt(mailbox.user))]
        config = load_config(oauth_config(tmp_path, mailbox, endpoint))

        async def two_polls() -> list[str]:
            store = await Store.open(config.storage.database)
            try:
                account = config.accounts[0]
                one = await fetch_account(account, store)
                await asyncio.sleep(3.5)  # the first token's exp is now past
                mailbox.deliver(b"Subject: two\r\n\r\nbody\r\n")
                two = await fetch_account(account, store)
                return [one.status.value, two.status.value, str(one.new + two.new)]
            finally:
                await store.close()

        assert asyncio.run(two_polls()) == ["ok", "ok", "2"]
    assert len(endpoint.requests) == 2
    assert logins(mailbox) == ["XOAUTH2", "XOAUTH2"]
    assert failed_token_logins(mailbox) == 0


def test_a_fresh_token_is_reused_by_the_next_poll(tmp_path: Path, mailbox: Mailbox) -> None:
    import asyncio

    from mailingest.config import load_config
    from mailingest.fetch import fetch_account
    from mailingest.store import Store

    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
        config = load_config(oauth_config(tmp_path, mailbox, endpoint))

        async def two_polls() -> None:
            store = await Store.open(config.storage.database)
            try:
                for _ in range(2):
                    assert (await fetch_account(config.accounts[0], store)).status.value == "ok"
            finally:
                await store.close()

        asyncio.run(two_polls())
    assert len(endpoint.requests) == 1
    assert logins(mailbox) == ["XOAUTH2", "XOAUTH2"]


def test_a_revoked_refresh_token_pauses_the_account_after_one_attempt(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    mailbox.deliver(b"Subject: kept\r\n\r\nbody\r\n")
    refused = Reply(400, {"error": "invalid_grant", "error_description": "revoked"})
    with token_endpoint(refused) as endpoint:
        config = oauth_config(tmp_path, mailbox, endpoint)
        code, out = fetch_json(config)
        assert code == 77, out
        assert out["accounts"][0]["status"] == "auth_failed"
        assert "invalid_grant" in out["accounts"][0]["error"]
        code, out = fetch_json(config)  # paused: neither the endpoint nor Dovecot is asked
        assert code == 77 and "paused" in out["accounts"][0]["error"]
    assert len(endpoint.requests) == 1
    assert logins(mailbox) == [] and mailbox.count() == 1
    status = json.loads(run_cli(config, "status", "--json").stdout)
    assert status["accounts"][0]["paused"] is True
    assert status["accounts"][0]["pause_reason"] == "auth_failed"


def test_a_token_endpoint_that_is_down_is_transient(tmp_path: Path, mailbox: Mailbox) -> None:
    with token_endpoint(Reply(503, b"busy")) as endpoint:
        config = oauth_config(tmp_path, mailbox, endpoint)
        code, out = fetch_json(config)
    assert code == 75, out
    assert out["accounts"][0]["status"] == "temp_failed"
    status = json.loads(run_cli(config, "status", "--json").stdout)
    assert status["accounts"][0]["paused"] is False


def test_a_rotated_refresh_token_is_kept_sealed_and_used_after_a_restart(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    rotated = "rotated-refresh-Ub55-never-printed"
    with token_endpoint() as endpoint:
        endpoint.replies = [
            endpoint.token(access_jwt(mailbox.user), refresh_token=rotated),
            endpoint.token(access_jwt(mailbox.user)),
        ]
        config = oauth_config(tmp_path, mailbox, endpoint)
        assert fetch_json(config)[0] == 0
        assert fetch_json(config)[0] == 0  # a new process: the stored token, not the config's
    assert [r["refresh_token"] for r in endpoint.requests] == [REFRESH, rotated]
    database = (tmp_path / "mail.db").read_bytes()
    database += b"".join(p.read_bytes() for p in tmp_path.glob("mail.db-*"))
    assert rotated.encode() not in database and REFRESH.encode() not in database
    assert run_sql(tmp_path / "mail.db", "SELECT count(*) FROM oauth_tokens") == [(1,)]


def test_check_reports_the_mechanism_and_the_token_refresh(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
        config = oauth_config(tmp_path, mailbox, endpoint, mechanism="oauthbearer")
        proc = run_cli(config, "check", "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        pop3 = json.loads(proc.stdout)["accounts"][0]["pop3"]
        assert (pop3["status"], pop3["mechanism"]) == ("ok", "OAUTHBEARER")
        assert pop3["token"] == {"status": "ok", "error": None, "refreshed": True}
        human = run_cli(config, "check")
        assert b"OAUTHBEARER, token refreshed" in human.stdout

        endpoint.replies = [Reply(400, {"error": "invalid_grant"})]
        proc = run_cli(config, "check", "--json")
    assert proc.returncode == 77
    pop3 = json.loads(proc.stdout)["accounts"][0]["pop3"]
    assert pop3["token"]["status"] == "auth_failed" and pop3["mechanism"] is None
    assert logins(mailbox) == ["OAUTHBEARER", "OAUTHBEARER"]


def test_a_token_dovecot_refuses_is_an_auth_failure_with_one_login(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """A token signed with another key (revoked at the server): one refused login, paused."""
    forged = jwt.encode(
        {"sub": mailbox.user, "email": mailbox.user, "iss": OAUTH2_ISSUER, "exp": 2**31 - 1},
        b"another-key-entirely-000000000000",
        algorithm="HS256",
    )
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(forged)]
        config = oauth_config(tmp_path, mailbox, endpoint)
        code, out = fetch_json(config)
        assert code == 77 and out["accounts"][0]["status"] == "auth_failed", out
        assert fetch_json(config)[0] == 77
    assert failed_token_logins(mailbox) == 1
    assert forged not in json.dumps(out)


def test_no_secret_is_printed_at_any_log_level(tmp_path: Path, mailbox: Mailbox) -> None:
    mailbox.deliver(b"Subject: one\r\n\r\nbody\r\n")
    token = access_jwt(mailbox.user)
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(token, refresh_token="rotated-Zz9-never-printed")]
        config = oauth_config(tmp_path, mailbox, endpoint)
        outputs = [
            run_cli(config, "-v", "fetch"),
            run_cli(config, "-v", "check", "--json"),
            run_cli(config, "config"),
            run_cli(config, "-v", "status", "--json"),
        ]
    text = b"".join(p.stdout + p.stderr for p in outputs)
    assert outputs[0].returncode == 0, outputs[0].stderr.decode()
    for secret in (CLIENT_SECRET, REFRESH, token, "rotated-Zz9-never-printed", SEAL):
        assert secret.encode() not in text, secret


def test_a_daemon_pauses_on_a_refused_grant_once_and_resumes_with_a_new_token(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """In the daemon: one token request, one account_paused over several poll intervals;
    a new refresh token in the config and SIGHUP resume it and the mail flows."""
    mailbox.deliver(b"Subject: waiting\r\n\r\nbody\r\n")
    daemon_settings = {"poll_interval": "1s", "log_format": "json"}
    with token_endpoint(Reply(400, {"error": "invalid_grant"})) as endpoint:
        config = oauth_config(tmp_path, mailbox, endpoint)
        text = config.read_text().replace("[storage]", _daemon_table(daemon_settings) + "[storage]")
        config.write_text(text)
        with DaemonProcess(config) as daemon:
            daemon.wait_event("account_paused", account="m365")
            time.sleep(3.0)  # three poll intervals
            assert len(endpoint.requests) == 1
            endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
            config.write_text(text.replace(REFRESH, "a-new-refresh-token-Ja12"))
            daemon.send(signal.SIGHUP)
            wait_until(lambda: mailbox.count() == 0 or _stored(tmp_path) == 1, "the mail")
            wait_until(lambda: _stored(tmp_path) == 1, "the mail stored")
            assert daemon.stop()[0] == 0
            assert len(daemon.events("account_paused")) == 1
            assert len(daemon.events("account_resumed", account="m365")) == 1
            log_text = daemon.text()
    assert endpoint.requests[-1]["refresh_token"] == "a-new-refresh-token-Ja12"
    for secret in (REFRESH, CLIENT_SECRET, "a-new-refresh-token-Ja12"):
        assert secret not in log_text


def _daemon_table(settings: dict[str, str]) -> str:
    return "[daemon]\n" + "".join(f'{k} = "{v}"\n' for k, v in settings.items()) + "\n"


def _stored(tmp_path: Path) -> int:
    return int(run_sql(tmp_path / "mail.db", "SELECT count(*) FROM messages")[0][0])


def test_a_daemon_paused_on_a_refused_grant_resumes_with_the_token_auth_login_stores(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """The refused refresh token is never sent again: after `auth login`, the running
    daemon reads the new one from the store within an interval, without a reload."""
    mailbox.deliver(b"Subject: waiting\r\n\r\nbody\r\n")
    signed_in = "signed-in-refresh-Hc47-never-printed"
    with token_endpoint(Reply(400, {"error": "invalid_grant"})) as endpoint:
        config = oauth_config(tmp_path, mailbox, endpoint, device_url=endpoint.url)
        text = config.read_text()
        settings = {"poll_interval": "1s", "log_format": "json"}
        config.write_text(text.replace("[storage]", _daemon_table(settings) + "[storage]"))
        with DaemonProcess(config) as daemon:
            daemon.wait_event("account_paused", account="m365")
            endpoint.replies = sign_in_replies(endpoint, mailbox.user, signed_in)
            done = run_cli(config, "auth", "login", "--account", "m365")
            assert done.returncode == 0, done.stderr.decode()
            daemon.wait_event("account_resumed", account="m365", reason="pause_lifted")
            wait_until(lambda: _stored(tmp_path) == 1, "the mail stored")
            assert daemon.stop()[0] == 0
            assert len(daemon.events("account_paused")) == 1
            log_text = daemon.text()
    grants = [
        r["refresh_token"] for r in endpoint.requests if r.get("grant_type") == "refresh_token"
    ]
    assert grants == [REFRESH, signed_in]  # the refused one once, then the new one
    assert signed_in not in log_text and REFRESH not in log_text

"""OAuth2 accounts kept in the database (issue 15 with issue 14's `accounts`): added with
`accounts add --oauth2`, tested by signing in, their client secret sealed like a password,
signed in once with `auth login`, and polled by a running daemon; on both backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_accounts import database_dump, setup, stored_rows

from daemon_support import DaemonProcess, wait_until
from dovecot import Mailbox
from oauth2_support import access_jwt, logins, sign_in_replies
from support import StoreAt, fetch_json, run_cli
from token_endpoint import Reply, TokenEndpoint, token_endpoint

CLIENT_SECRET = "db-client-secret-Nm28-never-printed"
LOGIN_REFRESH = "db-login-refresh-Vb03-never-printed"


def add_oauth2(
    config: Path, box: Mailbox, endpoint: TokenEndpoint, *extra: str, secret: bool = True
) -> tuple[int, dict[str, Any], str]:
    args = [
        *("accounts", "add", "m365", "--owner", "alice", "--host", box.dovecot.host),
        *("--port", str(box.dovecot.port), "--security", "plain", "--allow-plaintext"),
        *("--username", box.user, "--oauth2", "custom", "--client-id", "app-db"),
        *("--token-url", endpoint.url, "--scope", "pop", "--json", *extra),
    ]
    if secret:
        args.append("--client-secret-stdin")
    done = run_cli(config, *args, stdin=CLIENT_SECRET.encode() + b"\n" if secret else b"")
    assert done.stdout, done.stderr.decode()
    assert CLIENT_SECRET.encode() not in done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr.decode()


def test_an_app_only_account_is_tested_by_signing_in_and_its_secret_is_sealed(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    mailbox.deliver(b"Subject: app-only\r\n\r\nbody\r\n")
    config = setup(tmp_path, store_at)
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
        code, result, _ = add_oauth2(config, mailbox, endpoint, "--grant", "client_credentials")
        assert code == 0 and result["added"] is True, result
        assert result["pop3"]["mechanism"] == "XOAUTH2" and result["pop3"]["messages"] == 1
        code, out = fetch_json(config)
        assert code == 0 and out["accounts"][0]["new"] == 1, out
    assert [r["client_secret"] for r in endpoint.requests] == [CLIENT_SECRET] * 2
    assert [r["grant_type"] for r in endpoint.requests] == ["client_credentials"] * 2
    dump = database_dump(store_at, request)
    assert b"app-db" in dump and CLIENT_SECRET.encode() not in dump


def test_a_refused_client_is_not_added(mailbox: Mailbox, store_at: StoreAt, tmp_path: Path) -> None:
    config = setup(tmp_path, store_at)
    with token_endpoint(Reply(401, {"error": "invalid_client"})) as endpoint:
        code, result, _ = add_oauth2(config, mailbox, endpoint, "--grant", "client_credentials")
    assert code == 77 and result["added"] is False
    assert "invalid_client" in result["pop3"]["error"]
    assert stored_rows(store_at) == 0 and logins(mailbox) == []


def test_a_user_account_signs_in_with_auth_login_and_a_running_daemon_polls_it(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    """Public client, refresh-token grant: added untested (nobody signed in yet), then
    `auth login` (device code); the running daemon, paused meanwhile, picks it up."""
    mailbox.deliver(b"Subject: user\r\n\r\nbody\r\n")
    config = setup(tmp_path, store_at)
    with token_endpoint() as endpoint:
        code, result, _ = add_oauth2(config, mailbox, endpoint, secret=False)
        assert code == 77 and "--no-test" in result["pop3"]["error"]  # the hint
        code, result, _ = add_oauth2(
            config, mailbox, endpoint, "--device-url", endpoint.url, "--no-test", secret=False
        )
        assert code == 0 and result["added"] is True
        with DaemonProcess(config) as daemon:
            daemon.wait_event("account_paused", account="m365")
            endpoint.replies = sign_in_replies(endpoint, mailbox.user, LOGIN_REFRESH)
            done = run_cli(config, "auth", "login", "--account", "m365")
            assert done.returncode == 0, done.stderr.decode()
            wait_until(lambda: mailbox.count() == 0 or bool(logins(mailbox)), "the poll")
            daemon.wait_event("poll_completed", account="m365")
            assert daemon.stop()[0] == 0
    assert endpoint.requests[-1]["refresh_token"] == LOGIN_REFRESH
    assert "client_secret" not in endpoint.requests[-1]  # a public client
    assert logins(mailbox) == ["XOAUTH2"]


def test_set_changes_the_client_secret_and_refuses_a_password(
    mailbox: Mailbox, store_at: StoreAt, tmp_path: Path
) -> None:
    config = setup(tmp_path, store_at)
    with token_endpoint() as endpoint:
        code, _, _ = add_oauth2(
            config, mailbox, endpoint, "--grant", "client_credentials", "--no-test"
        )
        assert code == 0
        done = run_cli(config, "accounts", "set", "m365", "--password-stdin", stdin=b"pw\n")
        assert done.returncode == 64 and b"--client-secret" in done.stderr
        done = run_cli(
            config, "accounts", "set", "m365", "--client-secret-stdin", "--json",
            stdin=b"second-secret-Qa11\n",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["changed"] == ["client_secret"]
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
        assert run_cli(config, "accounts", "test", "m365").returncode == 0
    assert endpoint.requests[-1]["client_secret"] == "second-secret-Qa11"

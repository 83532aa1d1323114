"""`mailingest auth login` (issue 15): the device-code flow and the browser flow with PKCE
on a loopback redirect, driven through the CLI against the loopback token endpoint; the
refresh token it stores is what the next fetch signs in with (real Dovecot)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from dovecot import Mailbox
from oauth2_support import access_jwt, device_reply, logins, oauth_config
from support import TIMEOUT, fetch_json, run_cli
from token_endpoint import Reply, token_endpoint

LOGIN_REFRESH = "login-refresh-Gd05-never-printed"


def test_device_sign_in_stores_the_token_the_next_fetch_uses(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    mailbox.deliver(b"Subject: after sign-in\r\n\r\nbody\r\n")
    with token_endpoint() as endpoint:
        config = oauth_config(
            tmp_path, mailbox, endpoint, refresh_token=None, device_url=endpoint.url
        )
        code, out = fetch_json(config)  # nobody signed in yet
        assert code == 77 and "auth login --account m365" in out["accounts"][0]["error"]
        assert endpoint.requests == []
        endpoint.replies = [
            device_reply(),
            Reply(400, {"error": "authorization_pending"}),
            endpoint.token(access_jwt(mailbox.user), refresh_token=LOGIN_REFRESH),
            endpoint.token(access_jwt(mailbox.user)),
        ]
        proc = run_cli(config, "auth", "login", "--account", "m365")
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"https://microsoft.example/devicelogin" in proc.stdout
        assert b"WXYZ-1234" in proc.stdout and b"signed in" in proc.stdout
        code, out = fetch_json(config)  # the pause ended with the sign-in
        assert code == 0 and out["accounts"][0]["new"] == 1, out
    device, pending, done, used = endpoint.requests
    assert device == {"client_id": "app-1", "scope": "pop"}
    assert (
        pending["grant_type"]
        == done["grant_type"]
        == "urn:ietf:params:oauth:grant-type:device_code"
    )
    assert done["device_code"] == "dev-code-1"
    assert used["refresh_token"] == LOGIN_REFRESH
    assert logins(mailbox) == ["XOAUTH2"]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("mail.db*"))
    assert LOGIN_REFRESH.encode() not in stored
    assert LOGIN_REFRESH.encode() not in proc.stdout + proc.stderr


def test_a_denied_device_sign_in_is_exit_77_and_stores_nothing(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    with token_endpoint() as endpoint:
        endpoint.replies = [device_reply(), Reply(400, {"error": "access_denied"})]
        config = oauth_config(tmp_path, mailbox, endpoint, device_url=endpoint.url)
        proc = run_cli(config, "auth", "login", "--account", "m365", "--flow", "device")
    assert proc.returncode == 77, proc.stderr.decode()
    assert b"access_denied" in proc.stderr


def _browser_login(
    config: Path, answer: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[bytes], dict[str, str]]:
    """Run the browser flow; play the browser: follow the printed address back to the
    loopback redirect with a code (and the request's state unless ``answer`` says else)."""
    cmd = [sys.executable, "-m", "mailingest", "-c", str(config), "auth", "login", "--account",
           "m365", "--flow", "browser", "--json"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    url = ""
    for _ in range(5):
        line = proc.stderr.readline().decode()
        if line.startswith("http"):
            url = line.strip()
            break
    assert url, "no sign-in address printed"
    query = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}
    back = {"code": "auth-code-7", "state": query["state"], **(answer or {})}
    target = f"{query['redirect_uri']}?{urllib.parse.urlencode(back)}"
    with urllib.request.urlopen(target, timeout=10) as page:
        assert page.status == 200
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), query


def test_browser_sign_in_with_pkce_on_a_loopback_redirect(tmp_path: Path, mailbox: Mailbox) -> None:
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user), refresh_token=LOGIN_REFRESH)]
        config = oauth_config(
            tmp_path,
            mailbox,
            endpoint,
            refresh_token=None,
            auth_url="https://accounts.example/o/oauth2/auth",
        )
        proc, query = _browser_login(config)
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout) == {
            "account": "m365",
            "service": "pop3",
            "flow": "browser",
            "scopes": ["pop"],
        }
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]
        assert fetch_json(config)[0] == 0
    assert query["redirect_uri"].startswith("http://127.0.0.1:")
    assert (query["response_type"], query["code_challenge_method"]) == ("code", "S256")
    exchange, used = endpoint.requests
    assert exchange["grant_type"] == "authorization_code" and exchange["code"] == "auth-code-7"
    digest = hashlib.sha256(exchange["code_verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).decode().rstrip("=") == query["code_challenge"]
    assert exchange["redirect_uri"] == query["redirect_uri"]
    assert used["refresh_token"] == LOGIN_REFRESH


def test_a_browser_answer_with_another_state_is_refused(tmp_path: Path, mailbox: Mailbox) -> None:
    with token_endpoint() as endpoint:
        config = oauth_config(
            tmp_path, mailbox, endpoint, auth_url="https://accounts.example/o/oauth2/auth"
        )
        proc, _ = _browser_login(config, {"state": "forged"})
    assert proc.returncode == 77, proc.stderr.decode()
    assert endpoint.requests == []  # no code was exchanged


def test_auth_login_of_an_app_only_account_tests_it_and_ends_its_pause(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    """Client credentials have no user step: the fix for a rejected login is elsewhere (a
    mailbox permission granted). `auth login` then proves it with a token and a login, and
    only then ends the pause."""
    mailbox.deliver(b"Subject: app\r\n\r\nbody\r\n")
    with token_endpoint() as endpoint:
        refused = Reply(401, {"error": "unauthorized_client"})
        endpoint.replies = [refused]
        config = oauth_config(
            tmp_path, mailbox, endpoint, grant="client_credentials", refresh_token=None
        )
        assert fetch_json(config)[0] == 77  # paused
        proc = run_cli(config, "auth", "login", "--account", "m365")
        assert proc.returncode == 77 and b"unauthorized_client" in proc.stderr
        assert fetch_json(config)[0] == 77  # still paused: nothing asked
        endpoint.replies = [endpoint.token(access_jwt(mailbox.user))]  # the admin fixed it
        proc = run_cli(config, "auth", "login", "--account", "m365", "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout)["flow"] == "client_credentials"
        code, out = fetch_json(config)
        assert code == 0 and out["accounts"][0]["new"] == 1, out
    assert len(endpoint.requests) == 4  # fetch, failed login test, login test, fetch
    assert logins(mailbox) == ["XOAUTH2", "XOAUTH2"]


def test_auth_login_smtp_for_an_account_without_smtp_is_a_usage_error(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    with token_endpoint() as endpoint:
        config = oauth_config(tmp_path, mailbox, endpoint, device_url=endpoint.url)
        proc = run_cli(config, "auth", "login", "--account", "m365", "--smtp")
    assert proc.returncode == 64 and b"no [accounts.smtp]" in proc.stderr
    assert endpoint.requests == []

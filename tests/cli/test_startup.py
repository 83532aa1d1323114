"""Start-up: a one-shot `fetch` imports only what it needs (issue 18). Not a timing test: it
reads which modules a fetch of an empty mailbox loads from Python's own import profile
(``-X importtime``), so a new top-level import of something heavy fails here, not in a
benchmark weeks later."""

from __future__ import annotations

import json
import re
from pathlib import Path

from builders import PASSWORD, USER, loopback_account
from pop3d import Mailbox, ThreadedPop3Server
from support import run_cli, write_config

#: Not needed by a fetch of password accounts that finds no new mail: the web stack and
#: metrics (`run` with [api]), SMTP (`send`, `reply`), the PostgreSQL driver, OAuth2 sign-in,
#: sealed passwords, the daemon and its retries, the terminal display, structlog (logs.py
#: writes the JSON lines), the other commands' modules, and of the standard library what
#: only a message (email, spool files) or another command needs.
NOT_IMPORTED = (
    *("aiohttp", "aiosmtplib", "psycopg", "prometheus_client", "httpx", "jwt"),
    *("cryptography", "tenacity", "rich", "structlog"),
    *("mailingest.api", "mailingest.smtp", "mailingest.outgoing", "mailingest.metrics"),
    *("mailingest.oauth2", "mailingest.config_auth", "mailingest.authlogin"),
    *("mailingest.daemon", "mailingest.retry", "mailingest.live", "mailingest.demo"),
    *("mailingest.popserver", "mailingest.config_render", "mailingest.review"),
    *("mailingest.cli_accounts", "mailingest.cli_api", "mailingest.cli_auth"),
    "mailingest.cli_review",
    *("email", "tempfile", "shutil", "uuid", "csv"),
)
IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", re.MULTILINE)


def test_a_fetch_of_an_empty_mailbox_imports_only_what_it_needs(tmp_path: Path) -> None:
    with ThreadedPop3Server([Mailbox(USER, PASSWORD, [])]) as server:
        account = loopback_account(server.port, name="a", username=USER, password=PASSWORD)
        config = write_config(tmp_path, [account])
        proc = run_cli(config, "fetch", "--json", env={"PYTHONPROFILEIMPORTTIME": "1"})

    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert json.loads(proc.stdout)["accounts"][0]["status"] == "ok"
    imported = set(IMPORTED.findall(stderr))
    assert {"asyncio", "poplib", "mailingest.fetch", "mailingest.store"} <= imported, stderr
    unneeded = sorted(
        name
        for name in imported
        if any(name == other or name.startswith(other + ".") for other in NOT_IMPORTED)
    )
    assert unneeded == [], f"a one-shot fetch imports {unneeded}: import them where used"

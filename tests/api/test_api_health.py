"""/healthz and /readyz say what failed, never how: no token is needed for them, so the
store's error (its address, the database's name) goes to the log, and the answer carries a
fixed cause. /readyz's write probe runs at most once per period, whatever the scrapers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
from test_api_store import Observer

from api_support import ApiWorld
from daemon_support import wait_until
from dovecot import Dovecot
from mailingest.api.ops import WriteProbe
from mailingest.store import Store
from postgres import Postgres
from support import StoreAt


@contextmanager
def refused(postgres: Postgres, database: str) -> Iterator[None]:
    """The database turns away every connection, and the open ones are cut."""
    with psycopg.connect(postgres.url(), password=postgres.password, autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )
        try:
            yield
        finally:
            admin.execute(f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")


def test_a_lost_store_is_a_fixed_cause_and_its_detail_is_logged(
    tmp_path: Path, dovecot: Dovecot, postgres: Postgres
) -> None:
    secret = tmp_path / "db-password"
    secret.write_text(postgres.password + "\n")
    secret.chmod(0o600)
    url = postgres.new_database()
    database = url.rsplit("/", 1)[1]
    world = ApiWorld(tmp_path, dovecot, storage=StoreAt(url, secret).storage())
    answers: dict[str, httpx.Response] = {}

    def failing(path: str) -> bool:
        answers[path] = world.get(None, path)
        return answers[path].status_code == 503

    world.token("alice", "alice")
    with world.running() as daemon:
        with refused(postgres, database):
            wait_until(lambda: failing("/healthz"), "/healthz to see the store gone")
            wait_until(lambda: failing("/readyz"), "/readyz to see the store gone")
            answers["/messages"] = world.get("alice", "/messages")
        assert answers["/messages"].status_code == 503
        assert answers["/messages"].json()["error"] == "unavailable"
        assert answers["/healthz"].json() == {"status": "failing", "store": "unreachable"}
        assert answers["/readyz"].json() == {
            "status": "not_ready",
            "accounts": "loaded",
            "store": "not_writable",
        }
        for answer in answers.values():
            assert database not in answer.text and "127.0.0.1" not in answer.text
        logged = daemon.events("api_store_check_failed")
        assert {e["check"] for e in logged} == {"reachable", "writable"}
        assert all(e["error"] for e in logged)
        (request,) = daemon.events("api_store_unavailable")
        assert request["path"] == "/messages" and database in request["error"]
        wait_until(lambda: not failing("/healthz"), "/healthz to see the store back")


async def test_the_write_probe_writes_at_most_once_per_period(store: Store) -> None:
    """Fifty readiness checks in one period write once; the next period writes again."""
    seen = Observer()
    store.observer = seen
    now = [1000.0]
    probe = WriteProbe(every=5.0, clock=lambda: now[0])
    assert await probe.check(store) is None
    assert len(seen.commits) == 1
    for _ in range(50):
        assert await probe.check(store) is None
    now[0] += 4.9
    assert await probe.check(store) is None
    assert len(seen.commits) == 1
    now[0] += 0.1
    assert await probe.check(store) is None
    assert len(seen.commits) == 2

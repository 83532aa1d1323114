"""Shared fixtures: one private Dovecot and one private PostgreSQL per test session, a fresh
mailbox per test, and a store on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dovecot import OAUTH2_KEY, Dovecot, Mailbox, private_dovecot
from mailingest.store import Store
from postgres import Postgres, private_postgres
from smtp_support import SmtpServer, make_cert, serving
from support import StoreAt

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A real Dovecot on 127.0.0.1 for the whole run; raises DovecotMissing if not installed."""
    kept = tmp_path_factory.mktemp("dovecot")
    with private_dovecot(keep_log_in=kept, oauth2_key=OAUTH2_KEY) as server:
        yield server


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Mailbox:
    """A new, empty user on the session's Dovecot (`u<n>`, password `pw-u<n>-Zq9!`)."""
    return dovecot.new_mailbox()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL on 127.0.0.1 for the whole run; raises PostgresMissing if not
    installed."""
    with private_postgres() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> StoreAt:
    """A new, empty store location on each backend: the test runs once per backend."""
    if request.param == "sqlite":
        return StoreAt(tmp_path / "mail.db")
    return request.getfixturevalue("postgres_at")


@pytest.fixture
def postgres_at(postgres: Postgres, tmp_path: Path) -> StoreAt:
    """A new, empty database on the session's PostgreSQL (its password in a 0600 file)."""
    secret = tmp_path / "db-password"
    secret.write_text(postgres.password + "\n")
    secret.chmod(0o600)
    return StoreAt(postgres.new_database(), secret)


@pytest.fixture
async def store(store_at: StoreAt) -> AsyncIterator[Store]:
    """A new store on each backend."""
    opened = await store_at.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def smtp_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("smtp-cert"))


@pytest.fixture
def smtp_server(smtp_cert: tuple[Path, Path]) -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) on loopback that requires STARTTLS, then AUTH."""
    with serving(smtp_cert, "starttls") as server:
        yield server

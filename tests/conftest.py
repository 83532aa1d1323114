"""Shared fixtures: one private Dovecot per test session, a fresh mailbox per test, a store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dovecot import Dovecot, Mailbox, private_dovecot
from mailingest.store import Store


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A real Dovecot on 127.0.0.1 for the whole run; raises DovecotMissing if not installed."""
    with private_dovecot(keep_log_in=tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Mailbox:
    """A new, empty user on the session's Dovecot (`u<n>`, password `pw-u<n>-Zq9!`)."""
    return dovecot.new_mailbox()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A new SQLite store in the test's own directory."""
    opened = await Store.open(tmp_path / "mail.db")
    try:
        yield opened
    finally:
        await opened.close()

"""The retry policy and the pause key, with an injected sleep: no real waiting."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from mailingest.config import Account, Secret
from mailingest.model import Status
from mailingest.pause import login_key, same_login
from mailingest.retry import Backoff, PollFailure, poll_retrying


class Sleeps:
    """An injected sleep that only records how long it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class Failing:
    """Fails with ``status`` ``times`` times, then succeeds."""

    def __init__(self, status: str, times: int, floor: float = 0.0) -> None:
        self.status, self.left, self.floor, self.calls = status, times, floor, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise PollFailure(Status(self.status), f"{self.status} #{self.calls}", floor=self.floor)
        return "ok"


@pytest.mark.parametrize("status", ["temp_failed", "unavailable"])
async def test_transient_failures_wait_longer_each_time_up_to_the_cap(status: str) -> None:
    sleeps, poll = Sleeps(), Failing(status, 10)
    policy = poll_retrying(backoff=Backoff(), interval=300, sleep=sleeps, stop=lambda: False)
    assert await policy(poll) == "ok"
    assert poll.calls == 11 and len(sleeps.waits) == 10
    assert 30 <= sleeps.waits[0] <= 45  # the first wait: 30 s plus up to half of it as jitter
    growing = [w for w in sleeps.waits if w < Backoff().cap - 15]
    assert len(growing) >= 5
    assert all(a < b for a, b in itertools.pairwise(growing))
    assert max(sleeps.waits) <= Backoff().cap
    assert sleeps.waits[-1] >= Backoff().cap - 15  # reached the cap and stayed there


async def test_a_short_interval_makes_the_first_retry_sooner() -> None:
    sleeps = Sleeps()
    policy = poll_retrying(backoff=Backoff(), interval=5, sleep=sleeps, stop=lambda: False)
    await policy(Failing("temp_failed", 1))
    assert 5 <= sleeps.waits[0] <= 7.5


@pytest.mark.parametrize("status", ["auth_failed", "tls_failed", "error"])
async def test_auth_tls_and_protocol_failures_are_not_retried(status: str) -> None:
    sleeps, poll = Sleeps(), Failing(status, 1)
    policy = poll_retrying(backoff=Backoff(), interval=60, sleep=sleeps, stop=lambda: False)
    with pytest.raises(PollFailure) as caught:
        await policy(poll)
    assert caught.value.status == status and not caught.value.transient
    assert poll.calls == 1 and sleeps.waits == []


async def test_login_delay_is_a_floor_under_the_backoff() -> None:
    sleeps = Sleeps()
    policy = poll_retrying(backoff=Backoff(), interval=60, sleep=sleeps, stop=lambda: False)
    await policy(Failing("temp_failed", 1, floor=300.0))
    assert sleeps.waits == [300.0]


async def test_stopping_ends_the_retries_with_our_error_not_tenacitys() -> None:
    sleeps, poll = Sleeps(), Failing("temp_failed", 100)
    policy = poll_retrying(
        backoff=Backoff(), interval=60, sleep=sleeps, stop=lambda: poll.calls >= 3
    )
    with pytest.raises(PollFailure):
        await policy(poll)
    assert poll.calls == 3 and len(sleeps.waits) == 2


def _account(**changes: Any) -> Account:
    base = Account(
        name="a",
        owner="alice",
        host="pop.example.org",
        port=995,
        security="tls",
        username="alice@example.org",
        password=Secret("literal", "", "first-password"),
    )
    return dataclasses.replace(base, **changes)


def test_the_pause_key_matches_only_the_login_that_was_rejected() -> None:
    key = login_key(_account())
    assert key.startswith("scrypt$") and "first-password" not in key
    assert same_login(key, _account())
    assert same_login(key, _account(poll_interval=60.0, magnet_label="CRM"))  # not the login
    assert not same_login(key, _account(password=Secret("literal", "", "second-password")))
    assert not same_login(key, _account(username="bob@example.org"))
    assert not same_login(key, _account(host="pop2.example.org"))
    assert login_key(_account()) != key  # salted
    assert not same_login("md5$00$00", _account()) and not same_login("scrypt$zz$00", _account())

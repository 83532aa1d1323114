"""The tenacity policies: which failed polls are retried, and how long an account waits.

A poll ends with a status (``fetch_account`` never raises for account failures). The
runner raises a failed one as ``PollFailure`` for tenacity, and the policy decides by the
status alone (``Status.transient``): refused, timeouts, drops, ``[SYS/TEMP]``,
``[IN-USE]``, LOGIN-DELAY, a busy lease, a locked store are retried. Authentication, TLS
and protocol failures are never retried early: the first would lock the mailbox, the
others would fail the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential, wait_random

from mailingest.model import Status


class PollFailure(Exception):
    """A poll that ended in a failed status, as an exception tenacity can judge.

    ``floor`` is the least wait the server allows (LOGIN-DELAY): a retry never comes sooner.
    """

    def __init__(self, status: Status, message: str | None, *, floor: float = 0.0) -> None:
        self.status = status
        self.message = message or status.value
        self.floor = floor
        super().__init__(self.message)

    @property
    def transient(self) -> bool:
        return self.status.transient


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, PollFailure) and exc.transient


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential waits with jitter, capped, per account.

    The first retry comes after ``min(initial, interval)`` (an account is never retried
    more eagerly than it polls), then the wait doubles up to ``cap``; a random jitter of up
    to ``jitter`` times the first wait keeps accounts that failed together (one provider's
    outage) from retrying together.
    """

    initial: float = 30.0
    cap: float = 1800.0
    jitter: float = 0.5

    def wait(self, interval: float) -> wait_base:
        first = max(min(self.initial, interval), 0.001)
        spread = min(first * self.jitter, self.cap / 4)
        exponential = wait_exponential(multiplier=first, max=max(first, self.cap - spread))
        return _not_before_floor(exponential + wait_random(0, spread))


class _not_before_floor(wait_base):
    """The backoff wait, but never shorter than the failure's LOGIN-DELAY floor."""

    def __init__(self, inner: wait_base) -> None:
        self.inner = inner

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = float(self.inner(retry_state))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, PollFailure):
            wait = max(wait, exc.floor)
        return wait


class stop_when(stop_base):
    """Stop retrying once ``predicate()`` holds: the daemon stops, or the account changed."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


def poll_retrying(
    *,
    backoff: Backoff,
    interval: float,
    sleep: Callable[[float], Awaitable[None]],
    stop: Callable[[], bool],
    before_sleep: Callable[[RetryCallState], Any] | None = None,
) -> AsyncRetrying:
    """The retry loop around one account's polls until one succeeds or fails for good.

    There is no attempt limit: a daemon keeps trying a mailbox that is down, at the capped
    rate. ``stop`` ends the loop early (shutdown, reload); ``reraise`` hands the caller our
    ``PollFailure`` rather than tenacity's ``RetryError``. ``sleep`` is injectable: the
    scheduler's sleep wakes on reload and shutdown, tests pass one that only records.
    """
    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=backoff.wait(interval),
        stop=stop_when(stop),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def attempt_wait(retry_state: RetryCallState) -> float:
    """The wait tenacity chose before the next attempt (for logs and ``next_poll``)."""
    action = retry_state.next_action
    return float(action.sleep) if action is not None else 0.0


def failure_of(retry_state: RetryCallState) -> PollFailure | None:
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    return exc if isinstance(exc, PollFailure) else None

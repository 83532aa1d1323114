"""One account's schedule in the daemon: sleep until due, poll under the gate, back off on
transient failures, pause on a rejected login.

Each account has its own task running an ``AccountRunner``, so one account's slowness or
failure never moves another's schedule; the only shared resource is the concurrency gate.
When the next poll is due, and the sleep until then, are timing.py's; the auth pause's state
is pausing.py's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from mailingest import pause
from mailingest.config import Account, DaemonSettings
from mailingest.daemon import timing
from mailingest.daemon.pausing import AccountPause
from mailingest.daemon.timing import seconds_until_login
from mailingest.errors import StoreError
from mailingest.fetch import FetchResult, log_poll_failed
from mailingest.lease import take_poll
from mailingest.logs import bound, get_logger
from mailingest.model import AccountState, Claim, Status
from mailingest.retry import Backoff, PollFailure, attempt_wait, failure_of, poll_retrying
from mailingest.store import Store

log = get_logger("mailingest.daemon")

#: One account's cycle (fetch.fetch_account; tests inject their own).
Fetch = Callable[..., Awaitable[FetchResult]]


class Interrupted(Exception):
    """The account changed or the daemon is stopping: this attempt does not start."""


class ClaimedElsewhere(Exception):
    """Another process on the database took this poll: the next one is ``wait`` s away."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"polled by another process; next poll in {wait:.0f} s")
        self.wait = wait


class RunnerHost(Protocol):
    """What a runner needs of the daemon that runs it (scheduler.Daemon): the runner
    depends on this, never on the scheduler itself."""

    @property
    def store(self) -> Store: ...

    @property
    def settings(self) -> DaemonSettings:
        """The ``[daemon]`` settings now (a reload may change them)."""
        ...

    @property
    def backoff(self) -> Backoff: ...

    @property
    def gate(self) -> asyncio.Semaphore:
        """The concurrency limit every poll waits for (a reload may replace it)."""
        ...

    @property
    def stopping(self) -> asyncio.Event: ...

    @property
    def fetch(self) -> Fetch: ...

    @property
    def dormant(self) -> set[AccountRunner]:
        """The runners that left their account to another process (takeover.py)."""
        ...

    def forget(self, runner: AccountRunner) -> None:
        """The runner's task ended."""

    def note_result(self, account: str, result: FetchResult) -> None:
        """A poll ended (for STATUS=)."""

    def status_changed(self) -> None:
        """Polling, paused or last error changed (for STATUS=)."""

    async def retag_after_poll(self, account: str) -> None:
        """A poll ended: re-tag what it stored if the sharing settings changed meanwhile."""


class AccountRunner:
    """One account's schedule: sleep until due, poll under the gate, retry, or pause."""

    def __init__(self, host: RunnerHost, account: Account) -> None:
        self.host = host
        self.account = account
        self.generation = 0  # bumped when a reload changes the account
        self.claimed_generation = 0  # a poll under newer settings is taken even if not due
        self.retired = False
        self.pause = AccountPause(host, account.name)
        self.in_flight = False
        self.task: asyncio.Task[None] | None = None
        self.due = 0.0  # loop time of the next poll
        self.lag: float | None = None
        self.alarm = timing.Alarm()
        self.polled = account  # the settings the last poll used (a reload may change them)
        self.planned: float | None = None  # loop time of the next poll, as the claim recorded
        self.lost = 0  # polls taken by another process in a row (see _elsewhere)
        self.dormant = False  # the next sleep leaves the account to another process

    def __repr__(self) -> str:
        state = "paused" if self.paused else ("polling" if self.in_flight else "idle")
        return f"<AccountRunner {self.account.name} {state} gen={self.generation}>"

    @property
    def name(self) -> str:
        return self.account.name

    @property
    def interval(self) -> float:
        return self.account.poll_interval or self.host.settings.poll_interval

    @property
    def paused(self) -> bool:
        return self.pause.active

    @property
    def done(self) -> bool:
        return self.retired or self.host.stopping.is_set()

    async def restore(self, state: AccountState | None, now: datetime) -> float:
        """Take up the state a previous run left (``now``: the daemon's start); returns the
        seconds until the first poll: soon, spread, unless a persisted next poll (a backoff)
        or LOGIN-DELAY says later. A recorded pause holds while the login is the rejected one.
        """
        if state is not None and state.paused:
            await self.pause.adopt(state.pause_key, self.account)
        return timing.first_delay(state, now, self.interval, self.paused)

    def start(self, delay: float) -> None:
        self.due = asyncio.get_running_loop().time() + delay
        self.task = asyncio.create_task(self._run(delay), name=f"poll:{self.name}")
        self.task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self.host.forget(self)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("poll_crashed", account=self.name, exc_info=exc)

    def wake(self) -> None:
        """End the current sleep (or the next one): reload, shutdown."""
        self.alarm.wake()

    async def _run(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        with bound(account=self.name):
            while not self.done:
                if delay > 0:
                    delay += self.spread()
                self.due = loop.time() + delay
                if self.dormant:
                    self.host.dormant.add(self)
                # Paused: woken by a reload, and once an interval to see whether a sign-in
                # lifted the pause in the store.
                await self.alarm.sleep(self.interval if self.paused else delay)
                if self.dormant:
                    self.dormant = False
                    self.host.dormant.discard(self)
                if self.paused and not self.done:
                    await self.pause.check_lifted(self.account)
                if self.done or self.paused:
                    continue
                delay = await self._cycle()

    async def _cycle(self) -> float:
        """Poll, retrying transient failures; the delay until the next poll."""
        generation = self.generation
        try:
            result: FetchResult = await self._attempts(generation)
        except Interrupted:
            return 0.0  # changed: poll again at once; stopping: the loop ends
        except ClaimedElsewhere as elsewhere:
            return self._elsewhere(elsewhere.wait)
        except PollFailure as failure:  # transient, and the retries stopped: as above
            self._poll_failed(failure.status, failure.message, None if self.done else 0.0)
            return 0.0
        except Exception:  # a bug must not end this account's polling for good
            log.exception("poll_crashed", account=self.name)
            return await self._schedule(self.interval)
        planned, self.planned = self.planned, None
        floor = seconds_until_login(result.next_login)
        if pause.rejected(result.status):
            self._poll_failed(result.status, result.error, None)  # paused: no retry
            await self.pause.begin(self.polled, lambda: self.account)
            return 0.0
        if planned is None:  # the claim was not recorded: an interval from now
            delay = timing.jittered(self.interval)
        else:  # as claimed: jittered, an interval from this poll's start
            delay = max(0.0, planned - asyncio.get_running_loop().time())
        if result.status is not Status.OK:
            # TLS or protocol: an early retry would fail the same way.
            delay = await self._schedule(delay, floor)
            self._poll_failed(result.status, result.error, None if self.done else round(delay, 3))
            return delay
        if result.new and result.sessions < self.host.settings.max_sessions_per_cycle:
            # The cycle stored new mail but started fewer sessions than it may: its last
            # listing held nothing new, or LOGIN-DELAY forbade the next login with mail
            # perhaps still waiting. In that case the next poll comes as soon as the server
            # allows. (When a session outlasted the delay and the next one found the mailbox
            # drained, this costs one early login that finds nothing.)
            if 0 < floor < delay:
                planned, delay = None, floor
        if planned is not None and delay >= floor:
            return delay  # the claim recorded it: no second write
        return await self._schedule(delay, floor)

    async def _attempts(self, generation: int) -> FetchResult:
        """The poll, and tenacity's retries once it failed transiently. Most polls succeed
        at once: they skip building the retry loop, a good part of an empty poll's CPU."""
        try:
            return await self._attempt(generation)
        except PollFailure as failure:
            first: PollFailure | None = failure
        retrying = poll_retrying(
            backoff=self.host.backoff,
            interval=self.interval,
            sleep=self._retry_sleep,
            stop=lambda: self.done or self.generation != generation,
            before_sleep=self._retry_scheduled,
        )

        async def attempt(generation: int) -> FetchResult:
            nonlocal first
            if first is not None:  # the failure above is the loop's first attempt
                failed, first = first, None
                raise failed
            return await self._attempt(generation)

        result: FetchResult = await retrying(attempt, generation)
        return result

    async def _attempt(self, generation: int) -> FetchResult:
        host = self.host
        if self.done or self.generation != generation:
            raise Interrupted
        account = self.polled = self.account
        try:
            async with host.gate:
                if self.done or self.generation != generation:
                    raise Interrupted
                # From its claim on, the poll is under way: a re-tag waits for its end (it
                # tags what it stores the way ``account`` says), and so does a stop.
                self.in_flight = True
                try:
                    # Under the gate: the claim moves the next poll an interval ahead from
                    # the moment this poll really starts, not from when it began to wait.
                    claim = await self._claim(generation)
                    self.lag = max(0.0, asyncio.get_running_loop().time() - self.due)
                    host.status_changed()
                    result = await host.fetch(
                        account,
                        host.store,
                        max_sessions=host.settings.max_sessions_per_cycle,
                        log_failure=False,  # logged here, with the wait before the next attempt
                        claim=claim,
                    )
                finally:
                    self.in_flight = False
        except (Interrupted, ClaimedElsewhere):
            await host.retag_after_poll(self.name)  # one that waited for this claim
            raise
        # A reload may have changed the sharing settings during this poll, which tagged what
        # it stored the old way: re-tagged now that it is over (or a failed re-tag retried).
        await host.retag_after_poll(self.name)
        if result.busy:  # another process is polling it now: this poll is theirs
            raise ClaimedElsewhere(self.interval)
        host.note_result(self.name, result)
        if result.status is Status.OK:
            return result
        failure = PollFailure(result.status, result.error)
        if failure.transient:
            failure.floor = seconds_until_login(result.next_login)
            raise failure
        return result

    async def _claim(self, generation: int) -> Claim | None:
        """Take this poll and the account's lease in the store (one statement), so that no
        other daemon on the database polls the account now; adopt a pause that another
        process recorded. None: the store failed, and the fetch will report it."""
        loop = asyncio.get_running_loop()
        self.planned = None
        now = datetime.now(UTC)
        force = generation != self.claimed_generation
        # The next regular poll, jittered, is chosen now: the claim records it for every
        # process, and a poll that goes as planned needs no second write.
        delay = timing.jittered(self.interval)
        due = (now, now + timedelta(seconds=delay))
        try:
            claim = await take_poll(self.host.store, self.name, due, force=force)
            if claim.paused:
                if await self.pause.adopt(claim.pause_key, self.account):
                    self.host.status_changed()  # another process's rejected login is this one
                    raise Interrupted
                # This config brings another login: the pause ended.
                claim = await take_poll(self.host.store, self.name, due, force=True)
        except StoreError as exc:
            log.error("state_not_recorded", account=self.name, error=str(exc))
            return None
        if claim.taken:
            self.lost = 0
            self.claimed_generation = generation
            self.planned = loop.time() + delay
            return claim
        if claim.busy:
            raise ClaimedElsewhere(self.interval)  # it is being polled now, by another
        due_at = datetime.fromisoformat(claim.next_poll) if claim.next_poll else now
        # The store keeps the next poll in whole seconds, cut short: the process that took
        # this one wakes at some point of that second. So does this runner, at random, and
        # the two contest the poll as equals (see _elsewhere); one that woke at the start of
        # the second would always win it.
        raise ClaimedElsewhere(max(0.1, (due_at - now).total_seconds() + random.random()))

    def _elsewhere(self, wait: float) -> float:
        """Another process took this poll; its next is ``wait`` s away. The first loss in a
        row contests that next poll (two daemons that start together race for each
        account); the second leaves the account to the other process: the runner goes
        dormant, woken if the account falls overdue (takeover.py), else after
        timing.DORMANT_INTERVALS intervals, a wake that falls between the other's polls and so
        loses once more, and contests the next one."""
        self.lost += 1
        if self.lost % 2:
            return wait
        self.dormant = True
        return wait + self.interval * (timing.DORMANT_INTERVALS - 1)

    def spread(self) -> float:
        return timing.claim_spread(self.interval)

    def _retry_scheduled(self, retry_state: Any) -> None:
        failure = failure_of(retry_state)
        wait = round(attempt_wait(retry_state), 3)
        status = failure.status if failure else Status.ERROR
        self._poll_failed(status, failure.message if failure else None, wait)
        log.warning(
            "retry_scheduled",
            account=self.name,
            attempt=retry_state.attempt_number,
            wait_s=wait,
            error_kind=status,
        )

    def _poll_failed(self, status: Status, error: str | None, retry_in: float | None) -> None:
        log_poll_failed(self.name, status, error, retry_in)

    async def _retry_sleep(self, seconds: float) -> None:
        await self._record_next_poll(seconds)
        await self.alarm.sleep(seconds)

    async def _schedule(self, delay: float, floor: float | None = None) -> float:
        """The next regular poll: ``delay`` from now, but never before LOGIN-DELAY allows
        (``floor`` s from now, if known; else read from the store)."""
        if floor is None:
            floor = await timing.login_floor(self.host.store, self.name)
        delay = max(delay, floor)
        await self._record_next_poll(delay)
        return delay

    async def _record_next_poll(self, delay: float) -> None:
        self.due = asyncio.get_running_loop().time() + delay
        await timing.record_next_poll(self.host.store, self.name, delay)

    def poll_now(self) -> bool:
        """Poll at once, due or not (the API's "fetch now"); False while paused. A poll
        under way is followed by another as soon as it ends."""
        if self.paused or self.done:
            return False
        self.claimed_generation = -1  # the next claim is forced (see _claim)
        self.wake()
        return True

    async def update(self, account: Account) -> bool:
        """A reload brought ``account``; True if it differs. A changed account polls at once,
        except a paused one whose login is still the rejected one."""
        if account == self.account:
            return False
        self.account = account
        self.generation += 1
        if await self.pause.holds_for(account):
            return True  # other settings changed; the login is still the rejected one
        self.wake()
        return True

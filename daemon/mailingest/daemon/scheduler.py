"""The daemon: one polling task per account under a concurrency limit, with backoff, the
auth-failure pause, reload on SIGHUP, a bounded stop on SIGTERM/SIGINT and sd_notify.

Shaped like arq's worker: ``Daemon.run()`` owns the event loop and always cleans up,
``Daemon.async_run()`` is the entry for tests; one task per account (``AccountRunner``) so one
account's slowness or failure never moves another's schedule; shutdown is stop taking work
-> grace period -> cancel -> close (process.py). The runners see the daemon only through
``RunnerHost``; protocol work stays in fetch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailingest import accounts, crm, logs
from mailingest.config import Account, Config, DaemonSettings, load_config
from mailingest.daemon import process
from mailingest.daemon.actors import ChangedBy
from mailingest.daemon.runner import AccountRunner, Fetch
from mailingest.errors import EX_OK, MailIngestError, StoreError
from mailingest.fetch import FetchResult, fetch_account
from mailingest.metrics import Metrics
from mailingest.model import AccountState, Status
from mailingest.retry import Backoff
from mailingest.store import Store
from mailingest.systemd import Notifier, watchdog_period

log = logs.get_logger("mailingest.daemon")

#: STATUS= is sent at most this often (seconds).
STATUS_EVERY = 1.0
#: How often the daemon looks for changes of the accounts kept in the database (seconds).
ACCOUNTS_EVERY = 2.0


class Daemon:
    """Polls every configured account until stopped (the runners' ``RunnerHost``)."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        backoff: Backoff | None = None,
        fetch: Fetch = fetch_account,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        #: The config file's own part of ``config`` (the rest: accounts in the database).
        self.file_config = config
        self.accounts_version = 0
        self.config_path = config_path
        self.backoff = backoff or Backoff()
        self.notifier = notifier or Notifier()
        self.stopping = asyncio.Event()
        self.gate = asyncio.Semaphore(config.daemon.max_concurrent)
        self.last_error: tuple[str, str] | None = None  # (account, error) until it recovers
        self.fetch = fetch
        self._runners: dict[str, AccountRunner] = {}
        self._retiring: set[AccountRunner] = set()  # removed by a reload, finishing their poll
        self._store: Store | None = None
        self._stop_at: float | None = None
        self._reloads: asyncio.Task[None] | None = None
        self._reload_again = False
        self._reread_file = False
        self._status_pending: asyncio.TimerHandle | None = None
        self._executors: list[ThreadPoolExecutor] = []
        self._owns_process = False
        self._sync_lock = asyncio.Lock()
        #: Accounts whose stored mail may still carry tags of older sharing settings: a poll
        #: under those settings is still storing, or the re-tag failed (retried after a poll).
        self.retag_pending: set[str] = set()
        #: Accounts whose tagging this daemon changed on a reload: re-tagged even if the
        #: saved snapshot already matches, as a CLI command may have saved the new settings
        #: while this daemon still stored mail under the old ones.
        self.retag_forced: set[str] = set()
        #: Who changed which account's settings through the API (the audit log's actor).
        self.changed_by = ChangedBy()
        #: /metrics; the gauges read the runners when scraped.
        self.metrics = Metrics()
        self.metrics.watch(lambda: len(self._runners), self.paused_count)
        #: The accounts are loaded and scheduled (the API's /readyz).
        self.ready = False

    def __repr__(self) -> str:
        return (
            f"<Daemon accounts={len(self._runners)} paused={self.paused_count()} "
            f"stopping={self.stopping.is_set()}>"
        )

    @property
    def store(self) -> Store:
        assert self._store is not None, "the store opens in async_run()"
        return self._store

    @property
    def settings(self) -> DaemonSettings:
        return self.config.daemon

    # -- entry points ---------------------------------------------------------------------

    def run(self) -> int:
        """Own the event loop and the process; return once stopped. The stop is bounded by
        ``shutdown_timeout`` even when a worker thread blocks (see process.py)."""
        self._owns_process = True
        with asyncio.Runner() as runner:
            code = runner.run(self.async_run())
            for executor in self._executors:
                executor.shutdown(wait=False, cancel_futures=True)
        return code

    async def async_run(self, *, signals: bool = True) -> int:
        """The daemon on the running loop (tests run it with ``signals=False``)."""
        loop = asyncio.get_running_loop()
        self._size_executor(self.config.daemon.max_concurrent)
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(process.log_loop_error)  # keep even these lines JSON
        watchdog: asyncio.Task[None] | None = None
        watcher: asyncio.Task[None] | None = None
        api = None
        if signals:  # before anything slow: a SIGTERM during start-up is a clean stop too
            loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            storage = self.config.storage
            self._store = await Store.open(storage.database, password=storage.reveal_password())
            self._store.observer = self.metrics
            self.accounts_version, self.config = await accounts.with_stored(self.store, self.config)
            logs.register_secrets(self.config.secrets())
            await self.sync_settings()  # settings changed while stopped: re-tag before polling
            states = await self.store.account_states(counts=False)
            await self._start(list(self.config.accounts), states)
            self.ready = True
            if self.config.api is not None:
                from mailingest.api.app import serve  # the web stack only where it serves

                api = await serve(self, self.config.api)
            log.info("daemon_started", accounts=len(self._runners), paused=self.paused_count())
            self.notifier.ready(self.summary())
            period = watchdog_period()
            if period is not None and self.notifier.enabled:
                watchdog = asyncio.create_task(self._watchdog(period), name="watchdog")
            watcher = asyncio.create_task(self._watch_accounts(), name="accounts")
            await self.stopping.wait()
        finally:
            self.stop("error")  # no-op after a signal; after an exception, still drain
            if api is not None:  # first: its requests use the store
                await api.close()
            self.notifier.stopping()
            abandoned = await self._drain()
            side = [task for task in (watchdog, watcher) if task is not None]
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            if self._status_pending is not None:
                self._status_pending.cancel()
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if self._store is not None:
                await self._store.close()
            self.notifier.close()
            log.info("daemon_stopped", abandoned=abandoned)
            if not self._owns_process:  # else keep it: leftovers are reported at loop close
                loop.set_exception_handler(previous_handler)
        return EX_OK

    def stop(self, reason: str = "requested") -> None:
        """Stop taking work; in-flight polls get the grace period (signal-handler safe)."""
        if self.stopping.is_set():
            return
        self._stop_at = time.monotonic()
        log.info("daemon_stopping", reason=reason)
        self.stopping.set()
        if self._owns_process:
            process.exit_at(self._by(process.EXIT_SHARE), self.config.daemon.shutdown_timeout)
        for runner in self._all_runners():
            runner.wake()

    def reload(self, *, file: bool = True) -> None:
        """SIGHUP: re-read the config file (``file``) and the accounts in the database;
        reloads never overlap (one runs, one may queue)."""
        if self.stopping.is_set() or (file and self.config_path is None):
            return
        self._reread_file = self._reread_file or file
        if self._reloads is not None and not self._reloads.done():
            self._reload_again = True
            return
        self._reloads = asyncio.create_task(self._reload_loop(), name="reload")

    async def accounts_changed(self) -> None:
        """The API changed the accounts kept in the database: apply that now (re-tag,
        add, remove) rather than at the next look, and return once it is applied."""
        self.reload(file=False)
        if self._reloads is not None:
            await asyncio.shield(self._reloads)

    def changing(self, account: str, actor: str) -> contextlib.AbstractContextManager[None]:
        """An API request changes ``account``'s settings: its re-tag is ``actor``'s."""
        return self.changed_by.changing(account, actor)

    def poll_now(self, account: str) -> bool | None:
        """Poll ``account`` at once (the API's "fetch now"): None if unknown, False if
        paused."""
        runner = self._runners.get(account)
        return runner.poll_now() if runner is not None else None

    async def _reload_loop(self) -> None:
        while True:
            self._reload_again = False
            await self._reload_once()
            if not self._reload_again or self.stopping.is_set():
                return

    async def _reload_once(self) -> None:
        file, self._reread_file = self._reread_file, False
        if file:
            self.notifier.reloading()
        try:
            if file:
                assert self.config_path is not None
                self.file_config = await asyncio.to_thread(load_config, self.config_path)
            version, new = await accounts.with_stored(self.store, self.file_config)
        except MailIngestError as exc:
            log.error("config_rejected", error=str(exc))
        else:
            self.accounts_version = version
            await self.apply(new)
        if file:
            self.notifier.ready(self.summary())

    async def _watch_accounts(self) -> None:
        """Apply changes of the accounts kept in the database: at once where the store
        notifies (PostgreSQL), else within ACCOUNTS_EVERY."""
        async with contextlib.aclosing(self.store.account_changes(ACCOUNTS_EVERY)) as changes:
            async for _ in changes:
                if self.stopping.is_set():
                    return
                await self._accounts_changed()

    async def _accounts_changed(self) -> None:
        """One look at the accounts version (see _watch_accounts)."""
        try:
            version = await self.store.accounts_version()
        except StoreError:
            return  # the polls report the store; try again next time
        if version != self.accounts_version:
            # The reload records the version once applied: a failed one is retried.
            self.reload(file=False)

    # -- configuration ----------------------------------------------------------------------

    async def apply(self, new: Config) -> None:
        """Switch to ``new``: add, remove and change accounts without dropping in-flight work."""
        logs.register_secrets(new.secrets())
        old = self.config
        restart_needed = [
            key
            for key, before, after in (
                ("storage.database", old.storage.database, new.storage.database),
                ("daemon.log_format", old.daemon.log_format, new.daemon.log_format),
                ("api", old.api, new.api),
            )
            if before != after
        ]
        self.config = new
        before = {a.name: crm.tagging(a) for a in old.accounts}
        self.retag_forced = {n for n in self.retag_forced if n in before} | {
            a.name for a in new.accounts if a.name in before and before[a.name] != crm.tagging(a)
        }
        if new.daemon.max_concurrent != old.daemon.max_concurrent:
            # Polls under the old gate keep their slot; new polls queue at the new size.
            self.gate = asyncio.Semaphore(new.daemon.max_concurrent)
            self._size_executor(new.daemon.max_concurrent)
        wanted = {a.name: a for a in new.accounts}
        removed = [name for name in self._runners if name not in wanted]
        for name in removed:
            runner = self._runners.pop(name)
            runner.retired = True
            self._retiring.add(runner)
            runner.wake()
        added = [a for a in new.accounts if a.name not in self._runners]
        changed = []
        for account in new.accounts:
            current = self._runners.get(account.name)
            if current is not None and await current.update(account):
                changed.append(account.name)
        if added:
            states = await self._states()
            await self._start(added, states)
        # After the runners took the new settings: a poll still under the old ones is then
        # either seen in flight here, or re-tags its account itself once it ends.
        await self.sync_settings()
        log.info(
            "config_reloaded",
            accounts=len(new.accounts),
            added=[a.name for a in added],
            removed=removed,
            changed=changed,
            restart_needed=restart_needed,
        )
        self.status_changed()

    async def sync_settings(self, names: Collection[str] | None = None) -> None:
        """Re-tag the stored mail of accounts (default: all) whose sharing settings changed,
        in one transaction: the code path of every CLI command's start.

        An account being polled under other settings is left until that poll ends (its runner
        calls this again then): a poll tags what it stores with the settings it started with,
        so re-tagging before it ends would leave that mail tagged the old way for good. A store
        error is logged, and the account's next poll tries again.
        """
        async with self._sync_lock:  # one at a time, each with the config current by then
            current = {a.name: a for a in self.config.accounts}
            wanted = set(current) if names is None else set(names) & set(current)
            polling = {
                r.name
                for r in self._all_runners()
                if r.in_flight
                and r.name in wanted
                and crm.tagging(r.polled) != crm.tagging(current[r.name])
            }
            todo = wanted - polling
            left = {n for n in self.retag_pending if n in current and n not in wanted}
            # Pending until the re-tag has committed: whoever waits for the set to empty
            # then reads the new tags.
            self.retag_pending = left | polling | todo
            self.changed_by.put_off(polling)
            if not todo:
                return
            forced = todo & self.retag_forced
            actors = self.changed_by.of(todo)
            try:
                changed = await crm.sync_settings(
                    self.store, self.config, todo, force=forced, actor="daemon", actors=actors
                )
            except StoreError as exc:
                log.error("state_not_recorded", error=str(exc))
                self.changed_by.put_off(todo)
                return
            self.changed_by.done(todo)
            self.retag_pending -= todo
            self.retag_forced -= forced
            if changed:
                log.info("mail_retagged", accounts=changed)

    async def retag_after_poll(self, account: str) -> None:
        """A poll of ``account`` ended: re-tag it if a reload changed its sharing settings
        while it polled, or if its last re-tag failed (see sync_settings)."""
        if account in self.retag_pending:
            await self.sync_settings([account])

    async def _states(self) -> dict[str, AccountState]:
        try:
            return await self.store.account_states(counts=False)
        except StoreError as exc:
            log.error("state_not_recorded", error=str(exc))
            return {}

    async def _start(self, accounts: list[Account], states: dict[str, AccountState]) -> None:
        """Create the accounts' runners: restore a pause, honour a persisted next poll."""
        first: dict[str, datetime | None] = {}
        now = datetime.now(UTC)
        for account in accounts:
            runner = AccountRunner(self, account)
            delay = await runner.restore(states.get(account.name), now)
            first[account.name] = None if runner.paused else now + timedelta(seconds=delay)
            self._runners[account.name] = runner
            runner.start(delay)
        with contextlib.suppress(StoreError):
            await self.store.set_next_polls(first)

    def _size_executor(self, concurrency: int) -> None:
        """New worker threads for ``concurrency`` (process.worker_pool); the old ones exit
        once their running jobs finish."""
        executor = process.worker_pool(concurrency)
        for old in self._executors:
            old.shutdown(wait=False)
        self._executors.append(executor)

    # -- state for status and systemd -------------------------------------------------------

    def forget(self, runner: AccountRunner) -> None:
        """A runner's task ended (removed by a reload, or stopped)."""
        self._retiring.discard(runner)

    def _all_runners(self) -> list[AccountRunner]:
        return [*self._runners.values(), *self._retiring]

    def paused_count(self) -> int:
        return sum(r.paused for r in self._runners.values())

    def summary(self) -> str:
        """The one-line STATUS=: accounts, polling now, paused, last error."""
        polling = sum(r.in_flight for r in self._all_runners())
        text = f"{len(self._runners)} accounts, {polling} polling, {self.paused_count()} paused"
        if self.last_error is not None:
            text += f"; last error: {self.last_error[1]}"
        return logs.mask_text(text)

    def lags(self) -> dict[str, float]:
        """How late (seconds) each account's last poll started after it was due."""
        return {name: r.lag for name, r in self._runners.items() if r.lag is not None}

    def note_result(self, account: str, result: FetchResult) -> None:
        """Remember the last error for STATUS=; forget it once that account polls fine."""
        self.metrics.poll_finished(result)
        if result.status is not Status.OK:
            self.last_error = (account, result.error or result.status)
        elif self.last_error is not None and self.last_error[0] == account:
            self.last_error = None
        self.status_changed()

    def status_changed(self) -> None:
        """Send STATUS= soon: changes within STATUS_EVERY go out as one datagram."""
        if not self.notifier.enabled or self._status_pending is not None:
            return

        def flush() -> None:
            self._status_pending = None
            self.notifier.status(self.summary())

        loop = asyncio.get_running_loop()
        self._status_pending = loop.call_later(STATUS_EVERY, flush)

    async def _watchdog(self, period: float) -> None:
        """WATCHDOG=1 from the event loop itself: a blocked loop stops the pings."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(period)

    # -- shutdown -----------------------------------------------------------------------------

    def _by(self, share: float) -> float:
        """Monotonic time at ``share`` of the stop budget after the stop began."""
        start = self._stop_at if self._stop_at is not None else time.monotonic()
        return start + self.config.daemon.shutdown_timeout * share

    async def _drain(self) -> int:
        """The runners' bounded stop (process.drain), then the reloads'; returns how many
        polls were abandoned."""
        abandoned = await process.drain(self._all_runners(), self._by)
        if self._reloads is not None:
            self._reloads.cancel()
            await asyncio.gather(self._reloads, return_exceptions=True)
        return abandoned


def run_daemon(config: Config, *, config_path: Path | None = None) -> int:
    process.raise_fd_limit()
    return Daemon(config, config_path).run()

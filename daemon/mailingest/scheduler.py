"""The daemon: one polling task per account under a concurrency limit, clean stop on signals.

Shaped like arq's worker: `run_daemon()` owns the loop and always cleans up, `Daemon.run()`
is the async entry for tests. A first slice: intervals with jitter, pause on auth failure,
SIGHUP reload, SIGTERM/SIGINT stop with a grace period. Backoff policies and systemd
notification build on this.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from pathlib import Path

import structlog

from mailingest.commands import size_executor
from mailingest.config import Account, Config, load_config
from mailingest.errors import EX_OK, MailIngestError
from mailingest.fetch import fetch_account
from mailingest.store import Store

log = structlog.get_logger("mailingest.scheduler")

#: Fraction of an interval added or removed at random, so accounts do not fire together.
JITTER = 0.1


class Daemon:
    """Polls every configured account until stopped."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.stopping = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._gate = asyncio.Semaphore(config.daemon.max_concurrent)
        self._paused: dict[str, str] = {}  # account -> password value that was rejected
        self._store: Store | None = None

    def __repr__(self) -> str:
        return f"<Daemon accounts={len(self._tasks)} stopping={self.stopping.is_set()}>"

    async def run(self, *, signals: bool = True) -> int:
        size_executor(self.config.daemon.max_concurrent)
        self._store = await Store.open(self.config.storage.database)
        loop = asyncio.get_running_loop()
        if signals:
            loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            self._start_accounts(self.config.accounts)
            log.info("daemon_started", accounts=len(self.config.accounts))
            await self.stopping.wait()
            await self._drain()
        finally:
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            await self._store.close()
        return EX_OK

    def stop(self, reason: str = "requested") -> None:
        if not self.stopping.is_set():
            log.info("daemon_stopping", reason=reason)
            self.stopping.set()

    def reload(self) -> None:
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except MailIngestError as exc:
            log.error("config_rejected", error=str(exc))
            return
        old = {a.name: a for a in self.config.accounts}
        self.config = new
        for account in new.accounts:
            if old.get(account.name) != account:
                task = self._tasks.pop(account.name, None)
                if task is not None:
                    task.cancel()
                self._start_accounts([account])
        for name in set(old) - {a.name for a in new.accounts}:
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
        log.info("config_reloaded", accounts=len(new.accounts))

    def _start_accounts(self, accounts: tuple[Account, ...] | list[Account]) -> None:
        for account in accounts:
            self._tasks[account.name] = asyncio.create_task(
                self._account_loop(account), name=f"poll:{account.name}"
            )

    async def _account_loop(self, account: Account) -> None:
        assert self._store is not None
        interval = account.poll_interval or self.config.daemon.poll_interval
        await asyncio.sleep(random.uniform(0, min(interval, 5.0)))  # spread the first polls
        while not self.stopping.is_set():
            rejected = self._paused.get(account.name)
            if rejected is not None and rejected == account.password.reveal():
                return  # paused until a reload brings another password
            self._paused.pop(account.name, None)
            async with self._gate:
                if self.stopping.is_set():
                    return
                # Shielded: a cancelled loop lets its cycle finish its commit and QUIT.
                result = await asyncio.shield(
                    fetch_account(
                        account, self._store, max_sessions=self.config.daemon.max_sessions_per_cycle
                    )
                )
            if result.status == "auth_failed":
                self._paused[account.name] = account.password.reveal()
                log.warning("account_paused", account=account.name, reason="auth_failed")
                return
            delay = interval * (1 + random.uniform(-JITTER, JITTER))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    async def _drain(self) -> None:
        """Let in-flight cycles finish within the grace period, then cancel them."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.daemon.shutdown_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def run_daemon(config: Config, *, config_path: Path | None = None) -> int:
    return asyncio.run(Daemon(config, config_path).run())

"""What the daemon tells systemd while it runs: STATUS=, one line of accounts, polls in
flight, paused accounts and the last error (until that account polls fine again), sent at
most once per STATUS_EVERY; and WATCHDOG=1 from the event loop itself, so that a blocked
loop stops the pings. READY=, RELOADING= and STOPPING= mark the daemon's life: the
scheduler sends those.
"""

from __future__ import annotations

import asyncio

from mailingest import logs
from mailingest.daemon.roster import Roster
from mailingest.fetch import FetchResult
from mailingest.model import Status
from mailingest.systemd import Notifier

#: STATUS= is sent at most this often (seconds).
STATUS_EVERY = 1.0


class StatusLine:
    """The STATUS= line and its sending; the runners are read when it is built."""

    def __init__(self, notifier: Notifier, runners: Roster) -> None:
        self.notifier = notifier
        self.runners = runners
        self.last_error: tuple[str, str] | None = None  # (account, error) until it recovers
        self._pending: asyncio.TimerHandle | None = None

    def summary(self) -> str:
        """The one-line STATUS=: accounts, polling now, paused, last error."""
        runners = self.runners
        polling = runners.polling_count()
        text = f"{len(runners)} accounts, {polling} polling, {runners.paused_count()} paused"
        if self.last_error is not None:
            text += f"; last error: {self.last_error[1]}"
        return logs.mask_text(text)

    def note_result(self, account: str, result: FetchResult) -> None:
        """Remember the last error; forget it once that account polls fine."""
        if result.status is not Status.OK:
            self.last_error = (account, result.error or result.status)
        elif self.last_error is not None and self.last_error[0] == account:
            self.last_error = None
        self.changed()

    def changed(self) -> None:
        """Send STATUS= soon: changes within STATUS_EVERY go out as one datagram."""
        if not self.notifier.enabled or self._pending is not None:
            return

        def flush() -> None:
            self._pending = None
            self.notifier.status(self.summary())

        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(STATUS_EVERY, flush)

    def close(self) -> None:
        """The daemon stops: a STATUS= not sent yet is dropped."""
        if self._pending is not None:
            self._pending.cancel()

    async def watchdog(self, period: float) -> None:
        """WATCHDOG=1 from the event loop itself: a blocked loop stops the pings."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(period)

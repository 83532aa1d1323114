"""Live progress of `fetch` on a terminal: the figures as messages arrive, and their display.

``Tally`` is the fetch side: one account's messages and bytes, counted as each message is
retrieved rather than once per committed batch. ``LiveProgress`` is the terminal side: one
line per account, redrawn in place by rich (imported only when a display is shown: the
CLI's start-up must not pay for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from mailingest.output import human_bytes

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live

#: ``progress(account, messages, bytes, done)``, always on the event loop's thread: (0, 0)
#: when the account's cycle starts, again as each message arrives, and once with
#: ``done=True`` and what the cycle stored.
Progress = Callable[[str, int, int, bool], None]


class Tally:
    """One account's live figures: what its cycle committed plus what it retrieved and has
    not committed yet. Mail retrieved by a session that ends before committing it is
    fetched again by the next one: it leaves the count (``drop``) so nothing counts twice.

    Its state lives on the event loop's thread; worker threads report through ``hook``.
    """

    def __init__(self, account: str, progress: Progress) -> None:
        self.account = account
        self.progress = progress
        self.loop = asyncio.get_running_loop()
        self.stored = (0, 0)
        self.pending = (0, 0)
        self.epoch = 0  # one per run of retrievals: a late report of a dropped one is ignored
        self.done = False
        self._report()

    def hook(self) -> Callable[[int], None]:
        """For a worker thread: call it with each message's size once it is received whole."""
        epoch = self.epoch

        def arrived(size: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody watches
                self.loop.call_soon_threadsafe(self._arrived, epoch, size)

        return arrived

    def _arrived(self, epoch: int, size: int) -> None:
        if epoch == self.epoch and not self.done:
            self.pending = (self.pending[0] + 1, self.pending[1] + size)
            self._report()

    def committed(self, messages: int, nbytes: int, sizes: Sequence[int]) -> None:
        """A batch (its messages' ``sizes``) is committed: the cycle has now stored
        ``messages`` and ``nbytes`` (duplicates are in ``sizes`` but not in those)."""
        self.stored = (messages, nbytes)
        self.pending = (self.pending[0] - len(sizes), self.pending[1] - sum(sizes))
        self._report()

    def drop(self) -> None:
        """The session's retrievals ended: what they brought and no commit stored is gone."""
        self.epoch += 1
        if self.pending != (0, 0):
            self.pending = (0, 0)
            self._report()

    def finish(self, messages: int, nbytes: int) -> None:
        """The cycle ended: the final figures are what it stored."""
        self.done = True
        self.stored, self.pending = (messages, nbytes), (0, 0)
        self._report()

    def _report(self) -> None:
        count, size = self.stored[0] + self.pending[0], self.stored[1] + self.pending[1]
        self.progress(self.account, count, size, self.done)


@dataclass
class _Line:
    """One account's line: its figures and when its cycle started (and ended)."""

    messages: int = 0
    bytes: int = 0
    started: float = 0.0
    ended: float | None = None

    def cells(self, now: float) -> tuple[str, str, str, str]:
        elapsed = max((self.ended or now) - self.started, 1e-3)
        return (
            f"{self.messages} msgs",
            human_bytes(self.bytes),
            f"{human_bytes(int(self.bytes / elapsed))}/s",
            "done" if self.ended is not None else "",
        )


class LiveProgress:
    """One line per account on the terminal (messages, bytes, rate), redrawn in place by
    rich's Live, which also prints log lines written to stderr above the lines (stderr is
    redirected while it runs, and logs.py writes to the current sys.stderr). The lines stay
    when it closes, with each account's final figures. Started by the first update.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines: dict[str, _Line] = {}
        self.lock = threading.Lock()  # rich's refresh thread reads ``lines``
        self.live: Live | None = None

    def __call__(self, account: str, messages: int, nbytes: int, done: bool) -> None:
        now = time.monotonic()
        with self.lock:
            line = self.lines.setdefault(account, _Line(started=now))
            line.messages, line.bytes = messages, nbytes
            if done:
                line.ended = now
        if self.live is None:
            self._start()

    def _start(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.out, highlight=False)
        # stdout is left alone: it may be a file, and the result table goes there after.
        self.live = Live(
            console=console,
            get_renderable=self._render,
            refresh_per_second=10,
            redirect_stdout=False,
            redirect_stderr=True,
        )
        self.live.start(refresh=True)

    def _render(self) -> RenderableType:
        from rich.table import Table

        now = time.monotonic()
        with self.lock:
            rows = [(name, *line.cells(now)) for name, line in self.lines.items()]
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, overflow="ellipsis")
        for _ in range(3):
            grid.add_column(justify="right", no_wrap=True)
        grid.add_column(no_wrap=True)
        for row in rows:
            grid.add_row(*row)
        return grid

    def close(self) -> None:
        """Draw the final figures once more and give the terminal back."""
        if self.live is not None:
            self.live.stop()
            self.live = None

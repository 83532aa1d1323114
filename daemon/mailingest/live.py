"""Live progress of `fetch` on a terminal, the display: one line per account, redrawn in
place by rich. Imported only when a display is shown (and rich only once it starts): the
CLI's start-up must not pay for it. progress.py is the fetch side.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from mailingest.output import human_bytes

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live


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

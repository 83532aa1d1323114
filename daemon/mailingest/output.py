"""Human output: aligned tables and sizes. JSON output is plain ``json.dumps`` in cli.py."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO | None = None
) -> None:
    """Columns padded to their widest cell; numbers right-aligned."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int) for row in rows) and rows for i in range(len(headers))]
    for index, row in enumerate(cells):
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.write("  ".join(parts).rstrip() + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


class LiveProgress:
    """One status line per terminal, rewritten in place: messages, bytes and rate per account."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.state: dict[str, tuple[int, int]] = {}

    def __call__(self, account: str, messages: int, nbytes: int) -> None:
        self.state[account] = (messages, nbytes)
        elapsed = max(time.monotonic() - self.started, 1e-3)
        parts = [
            f"{name}: {count} msgs, {human_bytes(size)} ({human_bytes(int(size / elapsed))}/s)"
            for name, (count, size) in self.state.items()
        ]
        self.out.write("\r\x1b[K" + " | ".join(parts)[:200])
        self.out.flush()

    def close(self) -> None:
        if self.state:
            self.out.write("\r\x1b[K")
            self.out.flush()

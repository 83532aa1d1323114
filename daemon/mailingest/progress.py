"""Live progress of `fetch` on a terminal, the fetch side: ``Tally`` counts one account's
messages and bytes as each message is retrieved rather than once per committed batch.
live.py is the terminal side (imported only when a display is shown).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

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

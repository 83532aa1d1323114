"""Who changed an account's sharing settings through the API: the audit log's actor of the
re-tag that applies the change, rather than "daemon", which applies it.

An API request names itself before it changes the store (``changing``): the daemon may
notice the change first (PostgreSQL notifies it at once) and re-tag on its own. A re-tag
put off (a poll under the old settings still storing, or a failed re-tag) keeps the name
until it is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator


class ChangedBy:
    def __init__(self) -> None:
        self._asking: dict[str, str] = {}  # account -> actor of a request in flight
        self._waiting: dict[str, str] = {}  # account -> actor of a re-tag put off

    @contextlib.contextmanager
    def changing(self, account: str, actor: str) -> Iterator[None]:
        """While a request changes ``account``'s settings and waits for them to apply."""
        self._asking[account] = actor
        try:
            yield
        finally:
            if self._asking.get(account) == actor:
                del self._asking[account]

    def of(self, accounts: Collection[str]) -> dict[str, str]:
        """The actor of each of ``accounts`` that an API request changed (the newest)."""
        found = {n: self._asking.get(n) or self._waiting.get(n) for n in accounts}
        return {n: actor for n, actor in found.items() if actor is not None}

    def put_off(self, accounts: Collection[str]) -> None:
        """The re-tag of ``accounts`` waits: remember who asked for it until then."""
        self._waiting |= self.of(accounts)

    def done(self, accounts: Collection[str]) -> None:
        for name in accounts:
            self._waiting.pop(name, None)

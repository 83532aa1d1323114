"""What the API needs of the daemon that serves it (scheduler.Daemon), and per request."""

from __future__ import annotations

import contextlib
from typing import Protocol

from aiohttp import web

from mailingest.api.auth import Caller
from mailingest.config import Config
from mailingest.store import Store


class ApiMetrics(Protocol):
    """What the API records and shows (metrics.Metrics; a helper process counts only)."""

    def answered(self, status: int, count: int = 1) -> None: ...

    def sent(self, ok: bool) -> None: ...

    def render(self) -> tuple[bytes, str]: ...


class ApiHost(Protocol):
    @property
    def store(self) -> Store: ...

    @property
    def config(self) -> Config:
        """The configuration now (a reload may change it), accounts in the database included."""
        ...

    @property
    def file_config(self) -> Config:
        """The config file's part of ``config`` (what `mailingest accounts` starts from)."""
        ...

    @property
    def metrics(self) -> ApiMetrics: ...

    async def accounts_changed(self) -> None:
        """Apply a change of the accounts kept in the database now (re-tag, add, remove)."""

    def changing(self, account: str, actor: str) -> contextlib.AbstractContextManager[None]:
        """Around a change of ``account``'s settings and its applying: the audit log names
        ``actor`` (the caller) for its re-tag, not the daemon that applies it."""
        ...

    def poll_now(self, account: str) -> bool | None:
        """Poll at once: None if unknown, False if paused."""

    @property
    def ready(self) -> bool:
        """The accounts are loaded and their polls scheduled."""
        ...


HOST = web.AppKey("host", ApiHost)
CALLER = "caller"


def host_of(request: web.Request) -> ApiHost:
    return request.app[HOST]


def caller_of(request: web.Request) -> Caller:
    caller: Caller = request[CALLER]
    return caller

"""Logging: the event catalog, the loggers, one JSON or console line per event, and the
redaction that keeps secrets out of logs (the mask itself is masking.py's).

The catalog (``EVENTS``) is what monitoring is built on; docs/logging.md documents it and
tests check both against every logger call in the package.

The lines are those structlog's ``JSONRenderer`` and ``ConsoleRenderer`` write after
``merge_contextvars``, ``add_log_level``, ``TimeStamper(fmt="iso", utc=True)`` and
``format_exc_info``. The JSON line is built here: importing structlog (and what it pulls in)
costs a one-shot command a sixth of its run. structlog renders the console lines (a terminal,
where start-up does not matter) and takes events while nothing is configured.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import ModuleType, TracebackType
from typing import Any, TextIO

from mailingest import masking
from mailingest.masking import mask_text as mask_text  # the callers' way to mask an error
from mailingest.masking import register_secrets as register_secrets

#: Every event name the code logs: "keys — meaning". A test checks the code against it.
EVENTS: dict[str, str] = {
    "daemon_started": "accounts, paused — the store is open and the schedule built",
    "daemon_stopping": "reason — a stop signal arrived; no new polls start",
    "daemon_stopped": "abandoned — in-flight polls ended (finished or abandoned); store closed",
    "config_reloaded": "accounts, added, removed, changed, restart_needed — SIGHUP applied it",
    "config_rejected": "error — SIGHUP brought an invalid configuration; the old one stays",
    "mail_retagged": "accounts — changed sharing settings re-tagged these accounts' stored mail",
    "poll_started": "account — a fetch cycle began (debug)",
    "poll_completed": "account, new, bytes, deleted, duration_ms — one cycle's summary",
    "poll_failed": "account, error_kind, error, retry_in_s — a cycle ended with an error",
    "poll_crashed": "account — an internal error (a bug) ended a cycle; traceback follows",
    "message_stored": "account, uidl, size — one message committed (debug)",
    "message_quarantined": "account, message, size, max_message_size — header kept (warning)",
    "message_released": "account, message, size — a quarantined message stored in full",
    "duplicate_uidl": "account, uidls — a listing held the same UIDL twice",
    "state_not_recorded": "account, error — the poll result could not be written",
    "stored_account_skipped": "account, error — an account kept in the database is not polled:"
    " the file defines one of that name, or it no longer validates",
    "account_busy": "account, holder — another process holds the account's lease; skipped",
    "takeover_check_failed": "error — the look for overdue accounts failed in the store",
    "account_paused": "account, reason — no more logins until the credentials change",
    "account_resumed": "account, reason — a reload brought other credentials; polling again",
    "retry_scheduled": "account, attempt, wait_s, error_kind — a transient failure backs off",
    "task_failed": "message — an asyncio task failed and nobody awaited it; traceback follows",
    "shutdown_forced": "timeout_s — work still blocked at the stop deadline; exiting anyway",
    "tls_verify_disabled": "account — certificate checks are off for this account",
    "demo_server_started": "port — the demo's loopback POP3 server is listening",
    "api_started": "host, port, tls, processes — `run` serves the HTTP API ([api])",
    "api_helper_started": "helper, pid — a helper process of the API answers",
    "api_helper_exited": "helper, code, restart_in_s — a helper process ended; restarted",
    "api_helper_not_started": "helper, error — a helper process could not be started",
    "api_helper_failed": "error — a helper process stopped: settings, version, store, port",
    "api_helper_said": "helper, line — a helper process wrote an unknown report line",
    "api_request_failed": "method, path, error — an internal error answered 500; traceback",
    "api_test_login_failed": "account, status, error — POST /accounts: its test login failed",
    "api_store_check_failed": "check, error — /healthz or /readyz found the store failing",
    "api_store_unavailable": "method, path, error — a request failed in the store: 503",
}

#: Keys on every line (``account`` where one applies), added by the processors below.
COMMON_KEYS = ("timestamp", "level", "event")


def event_keys(name: str) -> tuple[str, ...]:
    """The documented keys of one event, in catalog order."""
    keys = EVENTS[name].partition(" — ")[0]
    return tuple(k.strip() for k in keys.split(",") if k.strip())


_SECRET_KEYS = {"password", "pass", "secret", "auth", "authorization", "token"}


def _masked(value: Any) -> Any:
    """``value`` with every text in it masked (the keys of a nested object too); numbers
    and the rest as they are."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {
            mask_text(k) if isinstance(k, str) else k: (
                "***" if str(k).lower() in _SECRET_KEYS else _masked(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_masked(v) for v in value]
    return value


#: The keys every line gets from us, after the caller's (``level`` and ``timestamp``
#: replace a caller's): never a secret, so never masked, as a secret "info" or "2026" would
#: garble what monitoring reads.
_OWN_KEYS = frozenset(COMMON_KEYS)


def redact(event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-named keys and mask registered secret values anywhere in the event."""
    for key in list(event):
        if key not in _OWN_KEYS:
            event[key] = "***" if key.lower() in _SECRET_KEYS else _masked(event[key])
    return event


class _MaskRendered:
    """Wraps the console renderer: the finished line is masked too, whatever object carried
    a secret (a repr it writes of a value). The JSON line is not: every text in it is
    masked before it is written (``redact``, ``_json_line``), and a mask over the line
    would cut into its numbers and its JSON."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, method: str, event: MutableMapping[str, Any]) -> str:
        return masking.registered.mask(str(self.renderer(method, event)))


class _CurrentStderr:
    """``sys.stderr`` as it is at each write, not as it was at ``configure``: `fetch`'s live
    progress (rich's Live) swaps in a stream that prints each line above its own lines, so a
    log line on the terminal neither garbles them nor is overwritten."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _Sink:
    """Where configured events go: the least level, the renderer and the stream."""

    def __init__(self, level: int, render: Callable[[str, dict[str, Any]], str], out: Any) -> None:
        self.level = level
        self.render = render
        self.out = out
        self.lock = threading.Lock()


_sink: _Sink | None = None
_captures: list[list[dict[str, Any]]] = []
#: Keys bound to every event of the current context (``bound``), after the event's own.
_bound: ContextVar[dict[str, Any] | None] = ContextVar("mailingest_log_context", default=None)


#: One import of structlog at a time: the absent rich is seen process-wide meanwhile.
_IMPORTING = threading.Lock()


def _structlog() -> ModuleType:
    """structlog, imported while rich looks absent. structlog imports rich (console and
    traceback, some 40 ms) whenever it is installed, only to format tracebacks, which the
    chain here formats itself (before the secret mask). rich is for `fetch`'s live
    progress alone and is imported there; nothing else must pay for it."""
    with _IMPORTING:
        if "structlog" not in sys.modules and "rich" not in sys.modules:
            sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` fails
            try:
                import structlog
            finally:
                if "rich" in sys.modules and sys.modules["rich"] is None:
                    del sys.modules["rich"]
    import structlog

    return structlog


class Logger:
    """Called as structlog's filtering bound logger is: the event name, then its keys."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, event: str, **kw: Any) -> None:
        _emit(self.name, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        _emit(self.name, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        _emit(self.name, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        _emit(self.name, "error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """An error with the traceback of the exception being handled."""
        kw.setdefault("exc_info", True)
        _emit(self.name, "error", event, kw)


def get_logger(name: str) -> Logger:
    return Logger(name)


@contextlib.contextmanager
def bound(**kw: Any) -> Iterator[None]:
    """Add these keys to every event logged in this context (unless the event has them)."""
    token = _bound.set({**(_bound.get() or {}), **kw})
    try:
        yield
    finally:
        _bound.reset(token)


@contextlib.contextmanager
def capture() -> Iterator[list[dict[str, Any]]]:
    """Collect the events logged meanwhile instead of writing them, as structlog's
    ``capture_logs`` does: the keys, ``event`` and ``log_level``; nothing bound or added."""
    entries: list[dict[str, Any]] = []
    _captures.append(entries)
    try:
        yield entries
    finally:
        _captures.remove(entries)


def _emit(name: str, method: str, event: str, kw: dict[str, Any]) -> None:
    if _captures:
        _captures[-1].append({**kw, "event": event, "log_level": method})
        return
    sink = _sink
    if sink is None:
        getattr(_structlog().get_logger(name), method)(event, **kw)
        return
    if _LEVELS[method] < sink.level:
        return
    event_dict = dict(kw)
    event_dict["event"] = event
    for key, value in (_bound.get() or {}).items():
        event_dict.setdefault(key, value)
    event_dict["level"] = method
    event_dict["timestamp"] = datetime.now(tz=UTC).isoformat().replace("+00:00", "Z")
    # Tracebacks become text before redaction, so a secret in one is masked too.
    exc_info = _exc_info(event_dict.pop("exc_info", None))
    if exc_info is not None:
        event_dict["exception"] = _format_exception(exc_info)
    redact(event_dict)
    line = sink.render(method, event_dict)
    with sink.lock:
        print(line, file=sink.out, flush=True)


_ExcInfo = tuple[type[BaseException], BaseException, Any]


def _exc_info(value: Any) -> _ExcInfo | None:
    """An ``exc_info`` key's value as a triple: an exception, a triple, or true for the
    exception being handled."""
    if isinstance(value, BaseException):
        return (value.__class__, value, value.__traceback__)
    if isinstance(value, tuple) and len(value) == 3:
        kind, exc, tb = value
        if (
            isinstance(kind, type)
            and issubclass(kind, BaseException)
            and isinstance(exc, BaseException)
            and (tb is None or isinstance(tb, TracebackType))
        ):
            return (kind, exc, tb)
    if value:
        found = sys.exc_info()
        return None if found[0] is None else found
    return None


def _format_exception(exc_info: _ExcInfo) -> str:
    import io
    import traceback

    out = io.StringIO()
    traceback.print_exception(exc_info[0], exc_info[1], exc_info[2], None, out)
    return out.getvalue().removesuffix("\n")


def _json_line(_: str, event: dict[str, Any]) -> str:
    """The JSON line of a redacted event: every text in it is masked already. A value JSON
    cannot carry goes as its repr, masked before JSON escapes it (a secret with a backslash
    or a quote would match none of its forms after)."""
    return json.dumps(event, default=lambda value: mask_text(repr(value)))


def configure(fmt: str = "auto", *, level: int = 20, stream: TextIO | None = None) -> None:
    """JSON lines when not on a TTY (or asked), readable console output otherwise; events
    below ``level`` (10 debug, 20 info, 30 warning) are dropped."""
    global _sink
    out: Any = stream or _CurrentStderr()
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    render: Callable[[str, dict[str, Any]], str]
    if use_json:
        render = _json_line
    else:
        console = _structlog().dev.ConsoleRenderer(colors=out.isatty())
        render = _MaskRendered(lambda method, event: console(None, method, event))
    _sink = _Sink(level, render, out)


def reset() -> None:
    """Undo ``configure``: events go to structlog's defaults again (tests, library use)."""
    global _sink
    _sink = None

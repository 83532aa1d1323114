"""structlog set-up, the event catalog, and the redaction that keeps secrets out of logs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

#: Every event name the code logs, with its keys. A test checks the code against it.
EVENTS: dict[str, str] = {
    "daemon_started": "accounts — the daemon has its store open and its schedule built",
    "daemon_stopping": "reason — a stop signal arrived; in-flight fetches finish or are abandoned",
    "config_reloaded": "accounts — SIGHUP applied a new configuration",
    "config_rejected": "error — SIGHUP brought an invalid configuration; the old one stays",
    "poll_started": "account — a fetch cycle began",
    "poll_completed": "account, new, bytes, deleted, duration_ms — one cycle's summary",
    "poll_failed": "account, error_kind, error — a cycle ended with an error",
    "poll_crashed": "account — an internal error (a bug) ended a cycle; traceback follows",
    "message_stored": "account, uidl, size — one message committed (debug level)",
    "duplicate_uidl": "account, uidls — a listing held the same UIDL for several messages",
    "state_not_recorded": "account, error — the poll result could not be written",
    "account_busy": "account, holder — another process holds the account's lease; skipped",
    "account_paused": "account, reason — no more logins until the config changes",
    "retry_scheduled": "account, attempt, wait_s, error_kind — a transient failure backs off",
    "tls_verify_disabled": "account — certificate checks are off for this account",
    "demo_server_started": "port — the demo's loopback POP3 server is listening",
}

_SECRET_KEYS = {"password", "pass", "secret", "auth", "authorization", "token"}
_secrets: set[str] = set()


def register_secrets(values: Iterable[str]) -> None:
    """Remember secret values so that any log line containing one is masked."""
    _secrets.update(v for v in values if len(v) >= 3)


def _mask(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-named keys and mask registered secret values anywhere in the event."""
    for key in list(event):
        value = event[key]
        if key.lower() in _SECRET_KEYS:
            event[key] = "***"
        elif isinstance(value, str) and _secrets:
            event[key] = _mask(value)
    return event


def configure(
    fmt: str = "auto", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """JSON lines when not on a TTY (or asked), readable console output otherwise."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become text before redaction, so a secret in one is masked too.
        structlog.processors.format_exc_info,
        redact,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )

"""logs.py writes the lines structlog's chain wrote before it (docs/logging.md is a contract):
the same events through both give the same bytes, timestamps aside."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from mailingest import logs

SECRET = 'Pa"ss\\wörd-Zebra-42'
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Repr:
    def __repr__(self) -> str:
        return f"<object holding {SECRET}>"


def _log_every_shape(log: Any, bind: Callable[..., contextlib.AbstractContextManager[Any]]) -> None:
    """Levels, nesting, secrets, non-JSON values, bound keys and the three exc_info forms."""
    log.debug("poll_started", account="a")
    log.info("poll_completed", account="a", new=1, bytes=2, deleted=0, duration_ms=3)
    log.warning("poll_failed", account="b", error_kind="temp_failed", error=SECRET, retry_in_s=None)
    log.error("config_rejected", error={"nested": [SECRET, {"password": "x", "n": 1.5}]})
    log.info("x", line="PASS hunter2", auth="AUTH PLAIN AGFAYg==", obj=_Repr(), u="ü\u2028\x00")
    log.info("x", level="its own", s={"one"}, f=frozenset(), b=b"raw", t=(1, None, True))
    # One key, as the daemon binds: structlog merged several in the context's hash order.
    with bind(account="bound"):
        log.info("x", new=1)
        log.info("x", account="own")
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError as exc:
        log.exception("poll_crashed", account="a")
        log.error("task_failed", message="m", exc_info=True)
        caught = exc
    log.error("api_request_failed", method="GET", path="/", error="e", exc_info=caught)
    log.error("x", exc_info=(type(caught), caught, caught.__traceback__))
    log.error("x", exc_info=True)  # nothing being handled: no exception key


@contextlib.contextmanager
def _structlog_configured(fmt: str, level: int, out: io.StringIO) -> Iterator[None]:
    """The processor chain logs.configure gave structlog before logs.py wrote lines itself."""
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    masked = logs._MaskRendered(lambda method, event: renderer(None, method, event))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            lambda _, __, event: logs.redact(event),
            lambda _, method, event: masked(method, event),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize(
    ("fmt", "level", "stream"),
    [
        ("json", 10, io.StringIO),
        ("json", 20, io.StringIO),
        ("console", 10, io.StringIO),
        ("console", 20, _Terminal),
    ],
)
def test_lines_are_byte_for_byte_those_of_the_structlog_chain(
    fmt: str, level: int, stream: type[io.StringIO]
) -> None:
    logs.register_secrets([SECRET])
    theirs, ours = stream(), stream()
    with _structlog_configured(fmt, level, theirs):
        _log_every_shape(structlog.get_logger("t"), structlog.contextvars.bound_contextvars)
    logs.configure(fmt, level=level, stream=ours)
    try:
        _log_every_shape(logs.get_logger("t"), logs.bound)
    finally:
        logs.reset()
    # The tracebacks differ in their line numbers only where the two calls differ: none do.
    expected = TIMESTAMP.sub("T", theirs.getvalue())
    assert TIMESTAMP.sub("T", ours.getvalue()) == expected
    assert SECRET not in expected and expected.count("\n") >= 10


def test_capture_collects_events_as_structlog_capture_logs_did() -> None:
    with logs.capture() as events, logs.bound(account="ignored"):
        logs.get_logger("t").info("poll_completed", new=1)
        logs.get_logger("t").exception("poll_crashed", account="a")
    assert events == [
        {"new": 1, "event": "poll_completed", "log_level": "info"},
        {"account": "a", "exc_info": True, "event": "poll_crashed", "log_level": "error"},
    ]


def test_unconfigured_events_go_to_structlog() -> None:
    """Library use and tests that configure nothing: structlog's defaults, as before."""
    out = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(out))
    try:
        logs.get_logger("t").warning("account_busy", account="a", holder="h")
    finally:
        structlog.reset_defaults()
    assert "account_busy" in out.getvalue() and "holder=h" in out.getvalue()

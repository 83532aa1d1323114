"""mailingest: POP3 mail ingestion for a CRM."""

import sys


def _structlog_without_rich() -> None:
    """Import structlog while rich looks absent. structlog imports rich (console and
    traceback, some 40 ms) whenever it is installed, only to format tracebacks, which our
    log set-up formats itself (logs.py: before the secret mask). rich is for `fetch`'s live
    progress alone and is imported there; every other command must not pay for it."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_structlog_without_rich()

__version__ = "0.1.0"

__all__ = ["__version__"]

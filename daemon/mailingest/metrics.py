"""The daemon's Prometheus metrics (`/metrics`), in a registry the daemon owns.

One ``Metrics`` per daemon, never the global registry: tests run several daemons in one
process, and a library must not add to a host's default registry. docs/metrics.md lists
every metric; a test keeps it in step with ``NAMES``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mailingest.fetch import FetchResult
from mailingest.model import POLL_STATUSES

#: Poll durations: a quick empty poll to a long drain.
_POLL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: COMMIT durations: an fsync to a stalled disk or a lock wait.
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
SEND_RESULTS = ("ok", "failed")


class Metrics:
    """Counters fed by the daemon (poll results, sends), the store (commits, lease
    takeovers: a ``StoreObserver``) and the API; gauges read when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.polls = Counter(
            "mailingest_polls",
            "Polls ended, by result (the account status)",
            ["result"],
            registry=r,
        )
        for status in POLL_STATUSES:
            self.polls.labels(result=status.value)
        self.messages = Counter(
            "mailingest_messages_stored", "Messages stored by polls", registry=r
        )
        self.bytes = Counter(
            "mailingest_bytes_stored", "Bytes of messages stored by polls", registry=r
        )
        self.poll_seconds = Histogram(
            "mailingest_poll_duration_seconds",
            "Duration of one poll (a cycle of one account)",
            buckets=_POLL_BUCKETS,
            registry=r,
        )
        self.accounts = Gauge("mailingest_accounts", "Accounts the daemon polls", registry=r)
        self.paused = Gauge(
            "mailingest_accounts_paused",
            "Accounts paused after a rejected login (waiting for new credentials)",
            registry=r,
        )
        self.takeovers = Counter(
            "mailingest_lease_takeovers",
            "Account leases taken over from a holder that died or let its lease expire",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "mailingest_store_commit_seconds",
            "Duration of the COMMIT of one store write transaction",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self.sends = Counter(
            "mailingest_smtp_sends",
            "Messages sent over SMTP through the API, by result",
            ["result"],
            registry=r,
        )
        for result in SEND_RESULTS:
            self.sends.labels(result=result)
        self.requests = Counter(
            "mailingest_api_requests",
            "HTTP API requests answered, by status code",
            ["code"],
            registry=r,
        )
        self._answered: dict[int, Counter] = {}

    def answered(self, status: int, count: int = 1) -> None:
        """``count`` API requests were answered with ``status`` (here, or by a helper
        process: api/helpers.py); its counter is looked up once."""
        counter = self._answered.get(status)
        if counter is None:
            counter = self._answered[status] = self.requests.labels(code=str(status))
        counter.inc(count)

    def sent(self, ok: bool) -> None:
        """A send through the API ended (``ok``: the server took it)."""
        self.sends.labels(result="ok" if ok else "failed").inc()

    def watch(self, accounts: Callable[[], int], paused: Callable[[], int]) -> None:
        """The gauges read these when scraped."""
        self.accounts.set_function(accounts)
        self.paused.set_function(paused)

    def poll_finished(self, result: FetchResult) -> None:
        self.polls.labels(result=result.status.value).inc()
        self.messages.inc(result.new)
        self.bytes.inc(result.bytes)
        self.poll_seconds.observe(result.duration_ms / 1000)

    # StoreObserver

    def committed(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def lease_taken_over(self, account: str) -> None:
        self.takeovers.inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


#: Every metric family, as exposed (counters with ``_total``); docs/metrics.md lists them.
NAMES = (
    "mailingest_polls_total",
    "mailingest_messages_stored_total",
    "mailingest_bytes_stored_total",
    "mailingest_poll_duration_seconds",
    "mailingest_accounts",
    "mailingest_accounts_paused",
    "mailingest_lease_takeovers_total",
    "mailingest_store_commit_seconds",
    "mailingest_smtp_sends_total",
    "mailingest_api_requests_total",
)

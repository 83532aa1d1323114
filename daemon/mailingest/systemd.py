"""sd_notify over ``$NOTIFY_SOCKET`` with a plain datagram socket: no libsystemd needed.

systemd learns from these messages when the daemon is ready (``Type=notify``), reloading,
stopping and still healthy (``WatchdogSec=``), and shows the ``STATUS=`` line in
``systemctl status``. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

#: systemd shows STATUS= on one line; a longer text only clutters `systemctl status`.
STATUS_MAX = 200


def _address(raw: str | None) -> str | None:
    """The socket address: a path, or an abstract name ('@name' is sent as '\\0name')."""
    if not raw or raw[0] not in "/@" or len(raw) < 2:
        return None  # sd_notify(3) ignores anything else too
    return "\0" + raw[1:] if raw[0] == "@" else raw


def one_line(text: str, limit: int = STATUS_MAX) -> str:
    """Collapse whitespace so a multi-line error cannot break the key=value protocol."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class Notifier:
    """Sends notifications to the service manager; never raises and never blocks.

    A lost datagram is harmless (the next STATUS or WATCHDOG replaces it), so a full queue
    or a vanished socket is ignored rather than allowed to stall the event loop.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET"))
        self._sock: socket.socket | None = None
        self.sent = 0

    def __repr__(self) -> str:
        where = "off" if self.address is None else self.address.replace("\0", "@")
        return f"<Notifier {where} sent={self.sent}>"

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One notification of ``KEY=value`` lines; True if the datagram was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8"), self.address)
        except OSError:
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """The store is open and the schedule built (also: a reload is complete)."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=one_line(status))

    def reloading(self) -> bool:
        """A reload begins. MONOTONIC_USEC lets systemd match it to the reload request."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=one_line(text))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def watchdog_period(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises; None when systemd expects no pings from this process."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (e.g. our parent)
    return int(usec) / 1_000_000 / 2

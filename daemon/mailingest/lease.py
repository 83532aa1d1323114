"""The account lease: one process polls an account at a time, across daemons on one
database. A holder names its host and process, so a lease whose process died on this host
is taken over at once; elsewhere it expires (LEASE_TTL) while its holder stops renewing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
from datetime import datetime
from pathlib import Path

from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.model import Claim
from mailingest.store import Store

log = get_logger("mailingest.fetch")  # the events of a fetch, as before the split

#: An account's lease outlives its holder by at most this long; renewed every third of it.
LEASE_TTL = 60.0


async def take_poll(
    store: Store,
    account: str,
    due: tuple[datetime, datetime] | None = None,
    *,
    force: bool = False,
) -> Claim:
    """Take the account's lease (and, with ``due``, its scheduled poll: Store.take_poll)
    in a new holder's name; a lease left by a process of this host that died is taken over."""
    holder = f"{lease_host()}:{os.getpid()}:{_TOKEN}{next(_SERIAL)}"
    claim = await store.take_poll(account, holder, LEASE_TTL, due=due, force=force)
    if claim.busy and claim.holder is not None and dead_here(claim.holder):
        claim = await store.take_poll(
            account, holder, LEASE_TTL, due=due, force=force, stale=claim.holder
        )
    if claim.busy:
        log.info("account_busy", account=account, holder=claim.holder)
    return claim


class Renewer:
    """Renews the lease every third of its life while the cycle runs (if this process dies,
    it expires). A timer until the first renewal: most cycles end before it fires, and a
    timer costs less than a task per poll."""

    def __init__(self, store: Store, account: str, holder: str) -> None:
        self._job = (store, account, holder)
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(LEASE_TTL / 3, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        store, account, holder = self._job
        while True:
            with contextlib.suppress(StoreError):
                await store.renew_lease(account, holder, LEASE_TTL)
            await asyncio.sleep(LEASE_TTL / 3)

    def cancel(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


#: A lease holder is unique: host, process, this process's token and a serial number.
#: (Six random hex digits as uuid4 gave; uuid itself imports platform, a cost at each start.)
_TOKEN = os.urandom(3).hex()
_SERIAL = itertools.count(1)

#: Lease holders of the cycles running in this process. A lease in this process's name that
#: none of them holds was left by a cycle that could not release it (the store was locked):
#: without this, the daemon found its own leftover "busy" until the lease expired.
RUNNING: set[str] = set()


@functools.cache
def lease_host() -> str:
    """Where a lease holder's PID means something: the host name, plus the boot and the PID
    namespace. Containers that share a host name (host networking) each number their own
    processes: a PID alive in one is no proof of death in another."""
    scope = []
    with contextlib.suppress(OSError):
        scope.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        scope.append(os.readlink("/proc/self/ns/pid").strip("pid:[]"))
    host = socket.gethostname().replace(":", "_")
    return f"{host}/{'-'.join(scope)}" if scope else host


def dead_here(holder: str) -> bool:
    """A lease holder on this host whose process is gone (killed, crashed) holds nothing."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != lease_host() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return holder not in RUNNING
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False

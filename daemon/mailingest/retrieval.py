"""Retrieval: a batch of messages RETRieved into spool files (hashed and counted as they
stream in), each one's header parsed, as soon as it is in, into what the store links and
tags. Worker-thread side: it runs beside the event loop while the previous batch commits."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

from mailingest.config import Account
from mailingest.errors import MailIngestError, StoreError
from mailingest.matching import direction_of, link_addresses, normalize_all
from mailingest.model import NewMessage
from mailingest.parse import parse_headers, read_head
from mailingest.pop3 import Pop3Session

#: Group commit: a batch is committed (one fsync) after this many messages or bytes.
BATCH_COUNT = 200
BATCH_BYTES = 32 * 1024 * 1024
#: Spool files keep at most this much of one message in memory before going to disk.
SPOOL_MEMORY = 256 * 1024


class Spool:
    """One message on its way to the store: hashed and counted while it streams in."""

    def __init__(self, directory: Path) -> None:
        import tempfile  # with shutil, bz2 and lzma: not before the first message

        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, dir=str(directory))
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        self.file.write(data)

    def finish(self) -> None:
        """Write out what is still buffered: a full disk fails here, typed, not at a later
        seek or close, where it escaped as an internal error."""
        try:
            self.file.flush()
        except OSError as exc:
            raise StoreError(f"cannot spool the message: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        """Close (the file goes away); data that cannot be written out (disk full) is dropped."""
        with contextlib.suppress(OSError):
            self.file.close()


def batches(new: Sequence[tuple[int, str]], sizes: dict[int, int]) -> list[list[tuple[int, str]]]:
    """Cut the retrieval list into group-commit batches by count and listed bytes."""
    out: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    total = 0
    for num, uidl in new:
        size = sizes.get(num, 0)
        if current and (len(current) >= BATCH_COUNT or total + size > BATCH_BYTES):
            out.append(current)
            current, total = [], 0
        current.append((num, uidl))
        total += size
    if current:
        out.append(current)
    return out


def retrieve_spooled(
    session: Pop3Session,
    batch: list[tuple[int, str]],
    spool_dir: Path,
    suspect: set[str],
    header_only: bool = False,
    arrived: Callable[[int], None] | None = None,
    each: Callable[[int, str, Spool], None] | None = None,
) -> tuple[list[tuple[int, str, Spool]], MailIngestError | None]:
    """Worker-thread side: RETR a batch into spool files (pipelined when offered).

    Returns (number, ledger key, spool) per message received whole; ``arrived`` hears the
    size of each as it comes (live progress: Tally.hook); ``each`` gets every message as it
    completes, while the next ones are on the wire. The key is the UIDL,
    or, for a UIDL the listing holds more than once, the UIDL plus the content hash: such
    an id does not tell the messages apart, their content does. On a failure the messages
    received so far are returned with the error, so they are committed before it ends the
    session.
    """
    spools: dict[int, Spool] = {}

    def open_sink(num: int) -> Callable[[bytes], None]:
        spool = spools[num] = Spool(spool_dir)
        return spool.write

    uidl_of = dict(batch)
    done: list[tuple[int, str, Spool]] = []
    error: MailIngestError | None = None
    stream = session.retrieve([n for n, _ in batch], open_sink, header_only=header_only)
    try:
        for num in stream:
            spool, uidl = spools[num], uidl_of[num]
            spool.finish()
            key = f"{uidl}/{spool.hash.hexdigest()}" if uidl in suspect else uidl
            if each is not None:
                each(num, key, spool)  # first: a message it fails on is not among ``done``
            done.append((num, key, spool))
            if arrived is not None:
                arrived(spool.size)
    except MailIngestError as exc:
        error = exc
    except BaseException:
        for spool in spools.values():
            spool.discard()
        raise
    finally:
        stream.close()  # stopped early: the session is discarded now, before any DELE
    kept = {id(s) for _, _, s in done}
    for spool in spools.values():
        if id(spool) not in kept:
            spool.discard()
    return done, error


Retrieved = tuple[list[tuple[int, str, Spool]], list[NewMessage], MailIngestError | None]


def retrieve_prepared(
    account: Account,
    session: Pop3Session,
    batch: list[tuple[int, str]],
    spool_dir: Path,
    suspect: set[str],
    held: dict[int, int] | None,
    arrived: Callable[[int], None] | None,
) -> Retrieved:
    """Worker-thread side: RETR a batch and parse each message that came whole (see
    retrieve_spooled).

    ``held``: the batch is over the size limit; listed sizes by number. Only the headers
    are fetched (TOP), to be stored quarantined. Each message is parsed as soon as it is in,
    while the replies after it are still arriving, so the parsing overlaps the network."""
    items: list[NewMessage] = []

    def each(num: int, key: str, spool: Spool) -> None:
        items.append(prepare(account, num, key, spool, held))

    retrieved, failure = retrieve_spooled(
        session, batch, spool_dir, suspect, held is not None, arrived, each
    )
    return retrieved, items, failure


def prepare(
    account: Account, num: int, uidl: str, spool: Spool, held: dict[int, int] | None
) -> NewMessage:
    """Worker-thread side: parse headers, decide direction and the addresses that link."""
    spool.file.seek(0)
    headers = parse_headers(read_head(spool.file))
    direction = direction_of(headers, account.addresses)
    listed = held.get(num, spool.size) if held is not None else spool.size
    reason = (
        f"{listed} bytes over max_message_size {account.max_message_size}"
        if held is not None
        else None
    )
    return NewMessage(
        uidl=uidl,
        spool=spool.file,
        size=listed,
        quarantine=reason,
        sha256=spool.hash.hexdigest(),
        headers=headers,
        direction=direction,
        senders=normalize_all(headers.from_addrs),
        recipients_to=normalize_all(headers.to),
        recipients_cc=normalize_all(headers.cc),
        link=link_addresses(headers, direction),
    )

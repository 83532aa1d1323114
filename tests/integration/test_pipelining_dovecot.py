"""Pipelined RETR against a real Dovecot: same bytes as lock-step, and safe to kill mid-window.

Dovecot always advertises PIPELINING; a small proxy in front of it can take PIPELINING out of
its CAPA replies (the client then must go lock-step), counts how many RETR commands the client
has in flight, and can SIGKILL the fetch process while a window of replies is on the wire.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builders import crlf, dovecot_account, make_message, sha
from dovecot import Mailbox
from mailingest.retrieval import BATCH_COUNT
from support import fetch_json, run_cli, run_sql, write_config

_TERMINATOR = b"\r\n.\r\n"


class Conversation:
    """One client connection as the proxy saw it."""

    def __init__(self) -> None:
        self.retr_sent = 0
        self.retrieved = 0  # messages whose terminator has passed the proxy

    @property
    def outstanding(self) -> int:
        return self.retr_sent - self.retrieved


class Pop3Proxy:
    """A TCP proxy in front of Dovecot that watches each POP3 conversation.

    ``strip_pipelining`` drops the ``PIPELINING`` line from CAPA replies (everything the server
    sends before the first RETR is whole lines, so a line filter is exact there). After the
    first RETR it counts message terminators as they pass, so ``outstanding`` is the number of
    RETR commands sent whose message has not yet passed. ``on_retrieved(conversation, n)`` is
    called before a chunk from the server that completes ``n`` messages is passed on.
    """

    def __init__(self, target: int, *, strip_pipelining: bool = False) -> None:
        self.target = target
        self.strip_pipelining = strip_pipelining
        self.on_retrieved: Callable[[Conversation, int], None] | None = None
        self.max_outstanding = 0
        self.dele_sent = 0
        self.writes: list[bytes] = []  # the client's data, one entry per read off its socket
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            talk = Conversation()
            for pump in (self._client_to_server, self._server_to_client):
                threading.Thread(target=pump, args=(client, server, talk), daemon=True).start()

    def _client_to_server(
        self, client: socket.socket, server: socket.socket, talk: Conversation
    ) -> None:
        with _closing(client, server):
            pending = b""
            while data := _recv(client):
                pending += data
                *lines, pending = pending.split(b"\n")
                with self._lock:
                    self.writes.append(data)
                    for line in lines:
                        verb = line[:4].upper()
                        if verb == b"RETR":
                            talk.retr_sent += 1
                            self.max_outstanding = max(self.max_outstanding, talk.outstanding)
                        elif verb == b"DELE":
                            self.dele_sent += 1
                if not _send(server, data):
                    return

    def _server_to_client(
        self, client: socket.socket, server: socket.socket, talk: Conversation
    ) -> None:
        with _closing(client, server):
            held = b""  # before the first RETR: an incomplete line waiting for its end
            tail = b""  # after it: the last bytes passed on, for a terminator split in two
            while data := _recv(server):
                with self._lock:
                    counting = talk.retr_sent > 0
                if not counting:
                    held += data
                    cut = held.rfind(b"\n") + 1
                    data, held = held[:cut], held[cut:]
                    if self.strip_pipelining:
                        lines = data.split(b"\r\n")
                        data = b"\r\n".join(x for x in lines if x.upper() != b"PIPELINING")
                else:
                    window = tail + data
                    arriving = window.count(_TERMINATOR) - tail.count(_TERMINATOR)
                    tail = window[-(len(_TERMINATOR) - 1) :]
                    with self._lock:
                        # Counted before passing on: the client's next RETR comes after.
                        talk.retrieved += arriving
                    if self.on_retrieved is not None:
                        self.on_retrieved(talk, arriving)
                if data and not _send(client, data):
                    return


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
    except OSError:
        return False
    return True


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@contextmanager
def _closing(*socks: socket.socket) -> Iterator[None]:
    try:
        yield
    finally:
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@contextmanager
def pop3_proxy(target: int, *, strip_pipelining: bool = False) -> Iterator[Pop3Proxy]:
    proxy = Pop3Proxy(target, strip_pipelining=strip_pipelining)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


def _stored(config: Path) -> list[tuple[str, bytes]]:
    """(sha256 recorded, bytes reassembled from the chunks) of every stored message, sorted."""
    database = config.parent / "mail.db"
    recorded = dict(run_sql(database, "SELECT id, sha256 FROM messages"))
    raw: dict[int, bytes] = {}
    for message, data in run_sql(
        database, "SELECT message, data FROM message_chunks ORDER BY message, seq"
    ):
        raw[message] = raw.get(message, b"") + bytes(data)
    return sorted((recorded[m], raw.get(m, b"")) for m in recorded)


def _awkward_messages() -> list[bytes]:
    """Mail that exercises the framing: dot lines, long lines, bare LF, sizes across chunks."""
    messages = [make_message(i, body=f"plain body {i}\n".encode() * (i + 1)) for i in range(30)]
    messages += [
        make_message(100, body=b".\n..\n...leading dots\n.\n"),
        make_message(101, body=b"x" * 150_000 + b"\n" + b".y" * 40_000 + b"\n"),
        make_message(102, body=b""),
        make_message(103, body=b"mixed\r\nline\nends\r\n.\r\nand a dot line above\n"),
        make_message(104, body=b"0123456789abcdef\n" * 70_000),  # ~1.2 MB
        make_message(105, body=b"no final newline"),
    ]
    return messages


def test_pipelined_and_lockstep_fetches_store_identical_bytes(
    tmp_path: Path, mailbox: Mailbox
) -> None:
    messages = _awkward_messages()
    mailbox.deliver_many(messages)
    expected = sorted(sha(crlf(m)) for m in messages)
    stored: dict[str, list[tuple[str, bytes]]] = {}
    seen: dict[str, Pop3Proxy] = {}

    for mode, strip in (("pipelined", False), ("lockstep", True)):
        directory = tmp_path / mode
        directory.mkdir()
        with pop3_proxy(mailbox.dovecot.port, strip_pipelining=strip) as proxy:
            account = dovecot_account(mailbox, port=proxy.port)
            config = write_config(directory, [account])
            code, out = fetch_json(config)
            check = run_cli(config, "check", "--json")
        assert code == 0, out
        assert out["accounts"][0]["new"] == len(messages)
        capabilities = check.stdout.decode()
        assert ("PIPELINING" in capabilities) is not strip, capabilities
        stored[mode], seen[mode] = _stored(config), proxy

    assert seen["pipelined"].max_outstanding > 1, "the client never had two RETR in flight"
    assert seen["lockstep"].max_outstanding == 1, "RETR pipelined although not advertised"
    assert stored["pipelined"] == stored["lockstep"]
    assert [digest for digest, _ in stored["pipelined"]] == expected
    assert all(sha(raw) == digest for digest, raw in stored["pipelined"])


@pytest.mark.parametrize("strip", [False, True], ids=["pipelined", "lockstep"])
def test_round_trips_after_the_login(tmp_path: Path, mailbox: Mailbox, strip: bool) -> None:
    """Pipelined, the CAPA after the login goes out with UIDL and LIST, and every DELE of a
    session in one write; lock-step, each command waits for the reply before it. USER and
    PASS go lock-step either way (in one write they meet Dovecot's Nagle stall)."""
    count = 240  # under the listing size that makes a second session look for more
    mailbox.deliver_many(make_message(i) for i in range(count))
    with pop3_proxy(mailbox.dovecot.port, strip_pipelining=strip) as proxy:
        account = dovecot_account(mailbox, port=proxy.port, leave_on_server=False)
        code, out = fetch_json(write_config(tmp_path, [account]))
    assert code == 0, out
    assert out["accounts"][0]["new"] == out["accounts"][0]["deleted"] == count
    assert mailbox.count() == 0
    writes = proxy.writes
    dele = [w for w in writes if w.startswith(b"DELE")]
    assert sum(w.count(b"DELE ") for w in dele) == count
    logins = [w for w in writes if w.startswith((b"USER", b"PASS"))]
    assert [w[:5] for w in logins] == [b"USER ", b"PASS "] * writes.count(b"QUIT\r\n")
    if strip:
        after_pass = writes[[w[:4] for w in writes].index(b"PASS") + 1 :]
        assert after_pass[:3] == [b"CAPA\r\n", b"UIDL\r\n", b"LIST\r\n"], after_pass[:3]
        assert len(dele) == count
    else:
        assert b"CAPA\r\nUIDL\r\nLIST\r\n" in writes, writes[:6]
        assert writes.count(b"CAPA\r\n") == 1  # the one before the login
        assert len(dele) == 1, [len(w) for w in dele]  # a window holds 256
    assert writes[-1] == b"QUIT\r\n"


@pytest.mark.parametrize(
    "kill_after", [7, BATCH_COUNT + 20], ids=["first-batch", "after-one-commit"]
)
def test_fetch_killed_mid_window_loses_and_duplicates_nothing(
    tmp_path: Path, mailbox: Mailbox, kill_after: int
) -> None:
    """SIGKILL while RETR replies are in flight: the uncommitted batch is fetched again."""
    messages = [make_message(i, body=f"body {i}\n".encode() * 30) for i in range(BATCH_COUNT + 60)]
    mailbox.deliver_many(messages)
    expected = sorted(sha(crlf(m)) for m in messages)
    killed_with: list[int] = []

    with pop3_proxy(mailbox.dovecot.port) as proxy:
        account = dovecot_account(mailbox, port=proxy.port, leave_on_server=False)
        config = write_config(tmp_path, [account])
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def kill_mid_window(talk: Conversation, arriving: int) -> None:
            # RETR replies the client has not received: this chunk's and any after it.
            in_flight = talk.outstanding + arriving
            if talk.retrieved >= kill_after and in_flight > 1 and not killed_with:
                killed_with.append(in_flight)
                proc.send_signal(signal.SIGKILL)  # before this chunk reaches the client
                proc.wait(timeout=30)

        proxy.on_retrieved = kill_mid_window
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the fetch ended before the kill"
        dele_before_kill = proxy.dele_sent

    assert dele_before_kill == 0
    committed = _stored(config)
    # Only whole committed batches survive; the batch being downloaded is simply lost.
    assert len(committed) % BATCH_COUNT == 0
    assert len(committed) <= kill_after
    assert {digest for digest, _ in committed} <= set(expected)
    assert all(sha(raw) == digest for digest, raw in committed)
    assert mailbox.count() == len(messages)  # no DELE, no QUIT: the server deleted nothing

    config = write_config(tmp_path, [dovecot_account(mailbox, leave_on_server=False)])
    code, out = fetch_json(config)

    assert code == 0, out
    final = _stored(config)
    assert [digest for digest, _ in final] == expected  # nothing lost, nothing twice
    assert all(sha(raw) == digest for digest, raw in final)
    assert mailbox.count() == 0

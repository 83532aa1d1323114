"""The scripted POP3 test server: protocol round-trips and each fault it injects."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import email
import email.policy
import email.utils
import io
import poplib
import shutil
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from builders import self_signed_cert, served
from mailingest.samples import sample_mailboxes, sample_records_csv
from pop3d import Faults, Mailbox, Pop3d, Pop3TestServer, ThreadedPop3Server
from support import ROOT

HOST = "127.0.0.1"
TIMEOUT = 2.0
MESSAGES = [
    b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n",
    b"From: b@example.org\nSubject: two\n\nbare LF\n.starts with a dot\n.\n..two\nend\n",
    b"From: c@example.org\r\nSubject: three\r\n\r\nno final newline",
]

Serve = Callable[..., Awaitable[Pop3TestServer]]
Handshake = Literal["drop", "reset", "garbage"]


def scan_listing(resp: object) -> object:
    """poplib's LIST n returns the status line; typeshed says a tuple."""
    return resp


def box(user: str = "alice", messages: list[bytes] | None = None, **kw: Any) -> Mailbox:
    return Mailbox(user, "pw", list(MESSAGES if messages is None else messages), **kw)


@pytest.fixture
def serve(pop3d: Pop3d) -> Serve:
    """``await serve(faults, boxes, **kw)``: a scripted server (default: one ``box()``)."""

    async def start(
        faults: Faults | None = None, boxes: list[Mailbox] | None = None, **kw: Any
    ) -> Pop3TestServer:
        return await pop3d(boxes or [box()], faults, **kw)

    return start


@contextlib.contextmanager
def client(
    server: Pop3TestServer,
    user: str | None = "alice",
    password: str = "pw",
    timeout: float = TIMEOUT,
) -> Iterator[poplib.POP3]:
    conn = poplib.POP3(HOST, server.port, timeout=timeout)
    try:
        if user is not None:
            conn.user(user)
            conn.pass_(password)
        yield conn
    finally:
        conn.close()


def run(fn: Callable[[], Any]) -> Awaitable[Any]:
    return asyncio.to_thread(fn)


async def raw_session(server: Pop3TestServer, *sends: bytes) -> bytes:
    """Read the greeting, then send each chunk in one write; after each, read the replies.

    Every step gets some reply (or EOF) within TIMEOUT; after that 0.1 s of quiet ends it.
    """
    reader, writer = await asyncio.open_connection(HOST, server.port)
    out = bytearray()
    try:
        for data in (b"", *sends):
            writer.write(data)
            await writer.drain()
            wait = TIMEOUT
            with contextlib.suppress(TimeoutError):
                while chunk := await asyncio.wait_for(reader.read(65536), wait):
                    out += chunk
                    wait = 0.1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(out)


async def test_login_stat_list_uidl_retr_top_round_trip_byte_exact(serve: Serve) -> None:
    server = await serve()
    mailbox = server.mailbox("alice")

    def session() -> None:
        with client(server) as c:
            sizes = [len(served(m)) for m in MESSAGES]
            assert c.stat() == (3, sum(sizes))
            assert [int(x.split()[1]) for x in c.list()[1]] == sizes
            assert scan_listing(c.list(2)) == f"+OK 2 {sizes[1]}".encode()
            assert [x.split()[1].decode() for x in c.uidl()[1]] == mailbox.uidls
            for n, raw in enumerate(MESSAGES, 1):
                _, lines, octets = c.retr(n)
                assert b"\r\n".join(lines) + b"\r\n" == served(raw)
                assert octets == len(served(raw))
            _, top, _ = c.top(2, 1)
            assert top == [b"From: b@example.org", b"Subject: two", b"", b"bare LF"]
            c.quit()

    await run(session)
    assert len(set(mailbox.uidls or [])) == 3
    assert mailbox.remaining() == 3 and mailbox.deleted_total == 0
    assert server.sessions == 1 and server.login_attempts == 1


async def test_lines_starting_with_a_dot_are_stuffed_on_the_wire(serve: Serve) -> None:
    server = await serve()
    wire = await raw_session(server, b"USER alice\r\nPASS pw\r\nRETR 2\r\n")
    assert b"\r\n..starts with a dot\r\n..\r\n...two\r\nend\r\n.\r\n" in wire


async def test_dele_quit_expunges_but_a_dropped_session_deletes_nothing(serve: Serve) -> None:
    server = await serve()
    mailbox = server.mailbox("alice")
    await raw_session(server, b"USER alice\r\nPASS pw\r\nDELE 1\r\n")  # closes without QUIT
    assert mailbox.remaining() == 3

    def session() -> None:
        with client(server) as c:
            c.dele(1)
            c.rset()
            c.dele(2)
            with pytest.raises(poplib.error_proto, match="already deleted"):
                c.retr(2)
            assert c.stat()[0] == 2
            c.quit()

    await run(session)
    assert mailbox.messages == [MESSAGES[0], MESSAGES[2]]
    assert mailbox.deleted_total == 1 and len(mailbox.uidls or []) == 2


async def test_recent_alias_opens_the_same_mailbox(serve: Serve) -> None:
    dana = box("dana@example.com", aliases=("recent:dana@example.com",))
    server = await serve(boxes=[dana])
    assert server.mailbox("recent:dana@example.com") is dana

    def session(user: str) -> list[bytes]:
        with client(server, user) as c:
            uidls: list[bytes] = c.uidl()[1]
            c.quit()
            return uidls

    assert await run(lambda: session("recent:dana@example.com")) == await run(
        lambda: session("dana@example.com")
    )


async def test_wrong_password_unknown_command_and_redacted_log(serve: Serve) -> None:
    server = await serve()

    def session() -> None:
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] invalid login"):
            with client(server, password="wrong"):
                pass
        with client(server) as c:
            with pytest.raises(poplib.error_proto, match="not valid in this state"):
                c.user("bob")

    await run(session)
    assert b"\r\n-ERR unknown command\r\n" in await raw_session(server, b"XYZZY\r\n")
    assert "0: PASS ***" in server.log and "1: PASS ***" in server.log
    assert not any("wrong" in entry or "pw" in entry for entry in server.log)
    assert server.login_attempts == 2 and server.sessions == 1
    assert server.commands_seen("PASS") == 2 and server.commands_seen("XYZZY") == 1


async def test_capa_lists_defaults_and_none_makes_capa_unknown(serve: Serve) -> None:
    plain, bare = await serve(), await serve(Faults(capa=None))

    def capa(server: Pop3TestServer) -> dict[str, list[str]]:
        with client(server, None) as c:
            return c.capa()

    assert set(await run(lambda: capa(plain))) == {
        "TOP",
        "USER",
        "UIDL",
        "PIPELINING",
        "RESP-CODES",
    }
    with pytest.raises(poplib.error_proto, match="CAPA not supported"):
        await run(lambda: capa(bare))
    assert b"\r\n-ERR unknown command\r\n" in await raw_session(bare, b"CAPA\r\n")


async def test_drop_after_closes_before_the_command_takes_effect(serve: Serve) -> None:
    on_pass, on_quit = (
        await serve(Faults(drop_after="pass")),
        await serve(Faults(drop_after="QUIT")),
    )
    with pytest.raises((poplib.error_proto, OSError)):
        await run(lambda: client(on_pass).__enter__())
    assert on_pass.sessions == 0 and on_pass.login_attempts == 1

    def dele_then_quit() -> None:
        with client(on_quit) as c:
            c.dele(1)
            with pytest.raises((poplib.error_proto, OSError)):
                c.quit()

    await run(dele_then_quit)
    assert on_quit.mailbox("alice").remaining() == 3


async def test_drop_mid_retr_sends_half_the_message_then_closes(serve: Serve) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + b"y" * 1000 + b"\r\n"
    server = await serve(Faults(drop_mid_retr=2), boxes=[box(messages=[MESSAGES[0], big])])
    wire = await raw_session(server, b"USER alice\r\nPASS pw\r\nRETR 1\r\nRETR 2\r\n")
    body = wire.split(b"octets\r\n")[-1]
    assert body == big[: len(big) // 2]
    assert server.mailbox("alice").remaining() == 2


async def test_err_on_replies_with_the_line_and_matches_whole_words(serve: Serve) -> None:
    many = [b"Subject: %d\r\n\r\nx\r\n" % i for i in range(12)]
    server = await serve(
        Faults(err_on={"RETR 1": "-ERR [SYS/TEMP] try later"}), [box(messages=many)]
    )

    def session() -> None:
        with client(server) as c:
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] try later"):
                c.retr(1)
            assert c.retr(10)[1][0] == b"Subject: 9"

    await run(session)


async def test_hang_on_never_replies_so_the_client_times_out(serve: Serve) -> None:
    server = await serve(Faults(hang_on="STAT"))

    def session() -> None:
        with client(server, timeout=0.3) as c, pytest.raises(TimeoutError):
            c.stat()

    await run(session)


async def test_delay_holds_the_reply(serve: Serve) -> None:
    server = await serve(Faults(delay={"NOOP": 0.3}))

    def session() -> float:
        with client(server) as c:
            start = time.monotonic()
            c.noop()
            return time.monotonic() - start

    assert await run(session) >= 0.25


async def test_login_delay_is_advertised_and_enforced_per_mailbox(serve: Serve) -> None:
    now = [1000.0]
    server = await serve(Faults(login_delay=300), clock=lambda: now[0])

    def login() -> dict[str, list[str]]:
        with client(server) as c:
            caps: dict[str, list[str]] = c.capa()
            c.quit()
            return caps

    assert (await run(login))["LOGIN-DELAY"] == ["300"]
    now[0] += 299
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        await run(login)
    now[0] += 1
    await run(login)
    assert server.sessions == 2


async def test_max_list_shows_the_oldest_and_the_next_session_the_rest(serve: Serve) -> None:
    five = [b"Subject: %d\r\n\r\nbody\r\n" % i for i in range(5)]
    server = await serve(Faults(max_list=2), [box(messages=five)])

    def drain_once() -> list[bytes]:
        with client(server) as c:
            subjects = [c.top(n, 0)[1][0] for n in range(1, c.stat()[0] + 1)]
            for n in range(1, len(subjects) + 1):
                c.dele(n)
            c.quit()
            return subjects

    assert await run(drain_once) == [b"Subject: 0", b"Subject: 1"]
    assert await run(drain_once) == [b"Subject: 2", b"Subject: 3"]
    assert await run(drain_once) == [b"Subject: 4"]


async def test_hide_retrieved_acts_like_gmail_normal_mode(serve: Serve) -> None:
    mailbox = box(aliases=("recent:alice",))
    server = await serve(Faults(hide_retrieved=True), [mailbox])

    def session(user: str, retrieve: bool) -> int:
        with client(server, user) as c:
            count: int = c.stat()[0]
            if retrieve:
                c.retr(1)
            c.quit()
            return count

    assert await run(lambda: session("alice", True)) == 3
    assert await run(lambda: session("alice", False)) == 2
    assert await run(lambda: session("recent:alice", False)) == 3


async def test_pass_same_write_drop_loses_what_came_with_pass(serve: Serve) -> None:
    server = await serve(Faults(pass_same_write_drop=True))
    wire = await raw_session(server, b"USER alice\r\n", b"PASS pw\r\nSTAT\r\n", b"NOOP\r\n")
    assert wire.count(b"+OK") == 4  # greeting, USER, PASS, NOOP: STAT got no reply
    assert server.commands_seen("STAT") == 0 and server.commands_seen("NOOP") == 1


async def test_pipelined_commands_are_answered_in_order(serve: Serve) -> None:
    server = await serve()
    wire = await raw_session(server, b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST 1\r\nNOOP\r\nQUIT\r\n")
    lines = wire.split(b"\r\n")
    assert lines[3].startswith(b"+OK 3 ") and lines[4].startswith(b"+OK 1 ")
    assert lines[6].startswith(b"+OK bye")


async def test_utf8_is_advertised_accepted_and_recorded_only_when_enabled(serve: Serve) -> None:
    on, off = await serve(Faults(utf8=True)), await serve()

    def session(server: Pop3TestServer) -> dict[str, list[str]]:
        with client(server, None) as c:
            caps: dict[str, list[str]] = c.capa()
            c.utf8()
            return caps

    assert "UTF8" in await run(lambda: session(on))
    assert on.commands_seen("UTF8") == 1
    with pytest.raises(poplib.error_proto, match="unknown command"):
        await run(lambda: session(off))


async def test_reply_override_sends_raw_bytes_instead(serve: Serve) -> None:
    server = await serve(
        Faults(
            reply_override={
                "STAT": b"garbage\r\n",
                "NOOP": b"+OK " + b"x" * 70 * 1024 + b"\r\n",
                "LIST": b"+OK\r\n1 100\r\n",  # multi-line reply that never ends
            }
        )
    )

    def session() -> None:
        with client(server, timeout=0.3) as c:
            with pytest.raises(poplib.error_proto, match="garbage"):
                c.stat()
        with client(server, timeout=0.3) as c:
            with pytest.raises(poplib.error_proto, match="line too long"):
                c.noop()
        with client(server, timeout=0.3) as c:
            with pytest.raises(TimeoutError):
                c.list()

    await run(session)


async def test_second_concurrent_login_gets_in_use(serve: Serve) -> None:
    server = await serve()

    def session() -> None:
        with client(server) as first:
            with pytest.raises(poplib.error_proto, match=r"\[IN-USE\] mailbox locked"):
                client(server).__enter__()
            first.quit()
        with client(server) as again:
            again.quit()

    await run(session)
    assert server.sessions == 2


async def test_without_lock_a_message_expunged_elsewhere_vanishes(serve: Serve) -> None:
    server = await serve(Faults(in_use_lock=False))

    def session() -> None:
        with client(server) as a, client(server) as b:
            a.dele(1)
            a.quit()
            with pytest.raises(poplib.error_proto, match="message 1 expunged"):
                b.retr(1)
            assert b.retr(2)[1][0] == b"From: b@example.org"

    await run(session)


async def test_per_session_fails_once_then_works(serve: Serve) -> None:
    flaky = Faults(
        per_session=lambda n: (
            Faults(err_on={"PASS": "-ERR [IN-USE] locked"}) if n == 0 else Faults()
        )
    )
    server = await serve(flaky)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\] locked"):
        await run(lambda: client(server).__enter__())

    def works() -> int:
        with client(server) as c:
            return int(c.stat()[0])

    assert await run(works) == 3


async def test_bad_greetings(serve: Serve) -> None:
    garbage = await serve(Faults(greeting="garbage"))
    silent = await serve(Faults(drop_before_greeting=True))
    assert await raw_session(garbage) == b"garbage\r\n"
    assert await raw_session(silent) == b""


async def test_long_lines_stream_byte_exact(serve: Serve) -> None:
    huge = b"Subject: html\r\n\r\n" + b"<p>" * 400_000 + b"\r\n.tail\n"
    server = await serve(boxes=[box(messages=[huge])])
    reader, writer = await asyncio.open_connection(HOST, server.port, limit=4 << 20)
    try:
        writer.write(b"USER alice\r\nPASS pw\r\nRETR 1\r\n")
        for _ in range(4):
            await asyncio.wait_for(reader.readline(), TIMEOUT)
        body = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()
    assert body == served(huge).replace(b"\r\n.tail", b"\r\n..tail") + b".\r\n"


async def test_stop_closes_client_connections(serve: Serve) -> None:
    server = await serve()
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"+OK")
        await server.stop()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
def tls_context(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = self_signed_cert(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    return server_ctx, ssl.create_default_context(cafile=str(cert))


async def test_stls_upgrades_and_require_stls_refuses_plain_login(
    serve: Serve, tls_context: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_context
    server = await serve(Faults(require_stls=True), ssl_context=server_ctx)

    def session() -> None:
        with client(server, None) as c:
            assert "STLS" in c.capa()
            with pytest.raises(poplib.error_proto, match="STLS required"):
                c.user("alice")
            c.stls(client_ctx)
            c.user("alice")
            c.pass_("pw")
            assert c.stat()[0] == 3
            c.quit()

    await run(session)
    implicit = await serve(ssl_context=server_ctx, implicit_tls=True)

    def pop3s() -> int:
        conn = poplib.POP3_SSL(HOST, implicit.port, context=client_ctx, timeout=TIMEOUT)
        try:
            assert "STLS" not in conn.capa()
            conn.user("alice")
            conn.pass_("pw")
            return int(conn.stat()[0])
        finally:
            conn.close()

    assert await run(pop3s) == 3


async def test_idle_session_is_logged_out_without_expunging(serve: Serve) -> None:
    server = await serve(idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(b"USER alice\r\nPASS pw\r\nDELE 1\r\n")
        wire = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    assert wire.endswith(b"+OK message 1 deleted\r\n")
    assert server.mailbox("alice").remaining() == 3


def test_threaded_server_serves_the_sample_mailboxes() -> None:
    with ThreadedPop3Server(sample_mailboxes()) as threaded:
        for user, password, count in [
            ("alice", "demo-alice", 6),
            ("bob", "demo-bob", 4),
            ("recent:dana@example.com", "demo-dana", 4),
        ]:
            conn = poplib.POP3(threaded.host, threaded.port, timeout=TIMEOUT)
            try:
                conn.user(user)
                conn.pass_(password)
                assert conn.stat()[0] == count
                for n in range(1, count + 1):
                    conn.retr(n)
                conn.quit()
            finally:
                conn.close()
        assert threaded.server.commands_seen("RETR") == 14
    assert threaded.server.mailbox("alice").remaining() == 6


def _records() -> dict[str, set[str]]:
    rows = csv.DictReader(io.StringIO(sample_records_csv()))
    return {row["id"]: {addr.strip().lower() for addr in row["email"].split(";")} for row in rows}


def _normal(address: str) -> str:
    local, _, domain = address.lower().rpartition("@")
    return f"{local}@{domain.encode('idna').decode('ascii')}"


def test_sample_records_file_equals_the_bundled_text_and_matches_the_mail() -> None:
    path = ROOT / "config" / "records.sample.csv"
    assert path.read_text(encoding="utf-8") == sample_records_csv()
    known = {_normal(a): rid for rid, addrs in _records().items() for a in addrs}
    assert len(known) == 7 and any(len(a) > 1 for a in _records().values())
    linked: set[str] = set()
    message_ids: set[str] = set()
    for mailbox in sample_mailboxes():
        for raw in mailbox.messages:
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            message_ids.add(str(msg["Message-ID"]))
            assert (
                email.utils.parsedate_to_datetime(str(msg["Date"])).strftime("%Y-%m") == "2026-11"
            )
            for header in ("From", "To", "Cc"):
                for _, addr in email.utils.getaddresses([str(v) for v in msg.get_all(header, [])]):
                    if _normal(addr) in known:
                        linked.add(known[_normal(addr)])
    assert len(message_ids) == 14
    assert linked == set(_records())


def test_list_sizes_equal_the_octets_retr_serves() -> None:
    odd = [*MESSAGES, b"", b"a", b"a\r", b"\n\n", b"x\r\r\n", b".\n"]
    with ThreadedPop3Server([box(messages=odd)]) as threaded:
        conn = poplib.POP3(HOST, threaded.port, timeout=TIMEOUT)
        try:
            conn.user("alice")
            conn.pass_("pw")
            for n, raw in enumerate(odd, 1):
                _, lines, octets = conn.retr(n)
                assert scan_listing(conn.list(n)) == f"+OK {n} {octets}".encode()
                assert b"".join(line + b"\r\n" for line in lines) == served(raw)
        finally:
            conn.close()


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-tls", "stls"])
@pytest.mark.parametrize("how", ["drop", "reset", "garbage"])
async def test_tls_handshake_fault_answers_the_client_hello_without_tls(
    serve: Serve,
    tls_context: tuple[ssl.SSLContext, ssl.SSLContext],
    how: Handshake,
    implicit: bool,
) -> None:
    server_ctx, _ = tls_context
    server = await serve(Faults(tls_handshake=how), ssl_context=server_ctx, implicit_tls=implicit)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        if not implicit:
            assert (await reader.readline()).startswith(b"+OK")  # greeting
            writer.write(b"STLS\r\n")
            assert await reader.readline() == b"+OK begin TLS negotiation\r\n"
        writer.write(b"\x16\x03\x01\x00\x05hello")  # stands in for a ClientHello
        await writer.drain()
        if how == "reset":
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), TIMEOUT)
        elif how == "drop":
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        else:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            assert line == b"+OK plaintext POP3 server, not TLS\r\n"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert server.sessions == 0 and server.login_attempts == 0

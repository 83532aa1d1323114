"""The POP3 client against a misbehaving server: each fault ends typed, bounded and lossless.

Each test runs the real client (`Pop3Session`, mostly through `fetch_account`) against the
scripted loopback server with one fault injected, and checks that the cycle returns a typed
status naming the account within the socket timeout, that every message is stored byte-exact
or still on the server, and that nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import shutil
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import builders
from builders import (
    HOST,
    NAME,
    OWNER,
    PASSWORD,
    USER,
    expected,
    mailbox,
    message,
    self_signed_cert,
    served,
)
from dovecot import free_port
from mailingest.errors import (
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    STATUS_EXIT,
    ProtocolError,
    TemporaryError,
    TLSError,
)
from mailingest.pop3 import Pop3Session
from mailingest.pop3 import wire as pop3_wire
from mailingest.store import Store
from pop3d import Faults, Pop3d, Pop3TestServer, ThreadedPop3Server, first_session
from support import (
    assert_failed,
    fetch,
    poplib_digests,
    run_cli,
    run_sql,
    stored_hashes,
    write_config,
)

TIMEOUT = 1.0  # client socket timeout: every hang below ends after about this long
account = functools.partial(builders.account, timeout=TIMEOUT)
MESSAGES = [message(i) for i in range(1, 4)]


# -- connecting --------------------------------------------------------------------------------


async def test_connection_refused_is_unavailable(store: Store) -> None:
    result = await fetch(account(free_port()), store)
    assert_failed(result, "unavailable")
    assert await stored_hashes(store) == []


@pytest.mark.pop3d_faults(drop_before_greeting=True)
async def test_drop_before_greeting_is_temporary(store: Store, pop3d: Pop3d) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    result = await fetch(account(server.port), store)
    assert_failed(result, "temp_failed")
    assert server.log == []
    assert server.errors == []


@pytest.mark.parametrize(
    "greeting",
    [
        pytest.param("HELLO I am not POP3", id="garbage"),
        pytest.param("+ERR welcome", id="plus-err"),
        pytest.param("+OK " + "x" * 70_000, id="over-64-kib"),
    ],
)
async def test_garbage_greeting_is_a_protocol_error(
    store: Store, greeting: str, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)], Faults(greeting=greeting))
    result = await fetch(account(server.port), store)
    assert_failed(result, "error")
    assert server.login_attempts == 0  # never sent a password to it
    assert server.errors == []


async def test_plus_err_reply_to_pass_is_not_a_login(store: Store, pop3d: Pop3d) -> None:
    """poplib takes any "+" line as success; "+ERR" must not log us in."""
    faults = Faults(reply_override={"PASS": b"+ERR no\r\n"})
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await fetch(account(server.port), store)
    assert_failed(result, "error", "auth_failed")
    assert server.commands_seen("UIDL") == 0 and server.commands_seen("RETR") == 0
    assert server.errors == []
    assert await stored_hashes(store) == []


@pytest.mark.parametrize(
    "reply", ["-ERR [IN-USE] locked", "-ERR [LOGIN-DELAY] wait", "-ERR [SYS/TEMP] x"]
)
async def test_transient_response_code_at_login_is_temporary(
    store: Store, reply: str, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)], Faults(err_on={"PASS": reply}))
    result = await fetch(account(server.port), store)
    assert_failed(result, "temp_failed")
    assert server.login_attempts == 1
    assert server.errors == []


@pytest.mark.pop3d_faults(err_on={"PASS": "-ERR nope"})
async def test_plain_err_at_login_is_auth_failed(store: Store, pop3d: Pop3d) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    result = await fetch(account(server.port), store)
    assert_failed(result, "auth_failed")
    assert server.login_attempts == 1
    assert server.errors == []


@pytest.mark.parametrize(
    ("reply", "status"),
    [("-ERR no such user", "auth_failed"), ("-ERR [SYS/TEMP] x", "temp_failed")],
)
async def test_refused_user_is_reported_and_no_pass_follows(
    store: Store, reply: str, status: str, pop3d: Pop3d
) -> None:
    """USER and PASS go lock-step even where PIPELINING is offered: a refused USER is the
    error reported, and the password is never sent."""
    server = await pop3d([mailbox(MESSAGES)], Faults(err_on={"USER": reply}))
    result = await fetch(account(server.port), store)
    assert_failed(result, status)
    assert reply.removeprefix("-ERR ") in (result.error or "")
    assert server.commands_seen("PASS") == 0
    assert server.commands_seen("UIDL") == 0 and server.commands_seen("RETR") == 0
    assert server.errors == []
    assert await stored_hashes(store) == []


@pytest.mark.pop3d_faults(delay={"UIDL": 0.5})
async def test_in_use_lock_from_a_concurrent_login_is_temporary(store: Store, pop3d: Pop3d) -> None:
    server = await pop3d([mailbox(MESSAGES)])
    results = await asyncio.gather(
        fetch(account(server.port), store),
        fetch(account(server.port, name="twin"), store),  # same mailbox, other account
    )
    statuses = sorted(r.status for r in results)
    assert statuses == ["ok", "temp_failed"], results
    assert server.errors == []


# -- hangs and timeouts ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["CAPA", "PASS", "UIDL", "LIST", "RETR 1", "DELE 2", "QUIT"])
async def test_a_hanging_server_times_out_as_temporary_failure(
    store: Store, command: str, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)], first_session(Faults(hang_on=command)))
    acc = account(server.port, leave_on_server=False)
    started = time.monotonic()
    result = await fetch(acc, store)
    assert time.monotonic() - started < 5 * TIMEOUT
    assert_failed(result, "temp_failed")
    assert "timed out" in (result.error or "")
    assert server.mailbox(USER).remaining() == len(MESSAGES)  # no QUIT done: no expunge
    late = command in ("DELE 2", "QUIT")  # everything was committed before the hang
    assert await stored_hashes(store) == (expected(MESSAGES) if late else [])
    retrieved = server.commands_seen("RETR")

    again = await fetch(acc, store)
    assert again.status == "ok" and again.deleted == len(MESSAGES), again
    if late:
        assert server.commands_seen("RETR") == retrieved  # deleted without refetching
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


# -- broken replies ----------------------------------------------------------------------------


async def test_status_line_over_64_kib_is_a_protocol_error(store: Store, pop3d: Pop3d) -> None:
    huge = b"+OK " + b"x" * 70_000 + b"\r\n"
    server = await pop3d([mailbox(MESSAGES)], Faults(reply_override={"UIDL": huge}))
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_failed(result, "error")
    assert "65536" in (result.error or "")
    assert server.commands_seen("RETR") == 0 and server.commands_seen("DELE") == 0
    assert server.errors == []
    assert await stored_hashes(store) == []


async def test_over_long_stat_reply_breaks_the_session_for_good(pop3d: Pop3d) -> None:
    huge = b"+OK " + b"x" * 70_000 + b"\r\n"
    server = await pop3d([mailbox(MESSAGES)], Faults(reply_override={"STAT": huge}))
    session = Pop3Session(account(server.port).pop3_login())
    await asyncio.to_thread(session.connect)
    with pytest.raises(ProtocolError) as caught:
        await asyncio.to_thread(session.stat)
    assert caught.value.account == NAME
    assert session.broken
    with pytest.raises(ProtocolError):  # nothing more is ever sent on it
        await asyncio.to_thread(session.delete, [1])
    await asyncio.to_thread(session.close)
    assert server.commands_seen("DELE") == 0 and server.commands_seen("QUIT") == 0
    assert server.errors == []


@pytest.mark.parametrize("then", ["close", "silence"])
async def test_truncated_multiline_reply_stores_nothing_of_that_message(
    store: Store, then: str, pop3d: Pop3d
) -> None:
    """RETR 2's body lacks its terminating "." and then the server closes (or goes quiet)."""
    cut = b"+OK 40 octets\r\nFrom: x@example.org\r\nSubject: cut\r\n\r\npartial\r\n"
    faults = Faults(
        reply_override={"RETR 2": cut}, drop_after="RETR 3" if then == "close" else None
    )
    messages = MESSAGES if then == "close" else MESSAGES[:2]  # silence: RETR 2 is the last one
    server = await pop3d([mailbox(messages)], first_session(faults))
    acc = account(server.port, leave_on_server=False)
    first = await fetch(acc, store)
    assert_failed(first, "temp_failed", "error")
    assert await stored_hashes(store) == expected(messages[:1])
    assert server.commands_seen("DELE") == 0
    assert server.mailbox(USER).remaining() == len(messages)

    second = await fetch(acc, store)
    assert second.status == "ok", second
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(messages)


@pytest.mark.parametrize(
    "listing",
    [
        pytest.param(b"+OK\r\n1\r\n.\r\n", id="no-id"),
        pytest.param(b"+OK\r\none abc\r\n.\r\n", id="bad-number"),
        pytest.param(b"+OK\r\n1 \xff\xfe\r\n.\r\n", id="non-ascii-id"),
    ],
)
async def test_malformed_uidl_listing_is_an_error(
    store: Store, listing: bytes, pop3d: Pop3d
) -> None:
    faults = Faults(reply_override={"UIDL": listing})
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_failed(result, "error")
    assert "internal error" not in (result.error or "")
    assert server.commands_seen("RETR") == 0 and server.commands_seen("DELE") == 0
    assert server.errors == []


async def test_err_on_uidl_is_an_error_that_names_uidl(store: Store, pop3d: Pop3d) -> None:
    faults = Faults(err_on={"UIDL": "-ERR command not supported"})
    server = await pop3d([mailbox(MESSAGES)], faults)
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert_failed(result, "error")
    assert "UIDL" in (result.error or "")
    assert server.commands_seen("RETR") == 0 and server.commands_seen("DELE") == 0
    assert server.errors == []


async def test_err_on_dele_abandons_the_session_and_the_next_fetch_deletes(
    store: Store,
    pop3d: Pop3d,
) -> None:
    faults = first_session(Faults(err_on={"DELE 2": "-ERR cannot delete now"}))
    server = await pop3d([mailbox(MESSAGES)], faults)
    acc = account(server.port, leave_on_server=False)
    first = await fetch(acc, store)
    assert_failed(first, "error", "temp_failed")
    assert "QUIT" not in server.session_log(0)  # no QUIT: none of its DELEs applies
    assert await stored_hashes(store) == expected(MESSAGES)
    assert server.mailbox(USER).remaining() == len(MESSAGES)
    retrieved = server.commands_seen("RETR")

    second = await fetch(acc, store)
    assert second.status == "ok" and second.new == 0 and second.deleted == len(MESSAGES)
    assert server.commands_seen("RETR") == retrieved
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


@pytest.mark.parametrize(
    "capa",
    [
        pytest.param(b"+OK\r\nUIDL\r\nPIPE\xffLINING\r\n.\r\n", id="non-ascii"),
        pytest.param(b"+OK\r\nUIDL\r\n\r\n.\r\n", id="empty-line"),
    ],
)
async def test_malformed_capa_is_a_typed_protocol_error(
    store: Store, capa: bytes, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)], Faults(reply_override={"CAPA": capa}))
    result = await fetch(account(server.port), store)
    assert_failed(result, "error")
    assert "internal error" not in (result.error or "")
    assert server.errors == []


# -- login etiquette ---------------------------------------------------------------------------


@pytest.mark.pop3d_faults(pass_same_write_drop=True)
async def test_pass_is_never_pipelined_with_what_follows(store: Store, pop3d: Pop3d) -> None:
    """Courier drops whatever arrived in the same read as PASS; the fetch must not care."""
    server = await pop3d([mailbox(MESSAGES)])
    result = await fetch(account(server.port, leave_on_server=False), store)
    assert result.status == "ok", result
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


@pytest.mark.parametrize("advertised", [True, False])
async def test_utf8_is_sent_after_login_only_when_advertised(
    store: Store, advertised: bool, pop3d: Pop3d
) -> None:
    server = await pop3d([mailbox(MESSAGES)], Faults(utf8=advertised))
    result = await fetch(account(server.port), store)
    assert result.status == "ok", result
    if advertised:
        assert server.commands_seen("UTF8") == result.sessions
        for number in range(result.sessions):
            log = server.session_log(number)
            assert log.index("UTF8") > log.index("PASS ***")  # after login, once
    else:
        assert server.commands_seen("UTF8") == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


# -- byte-exact storage ------------------------------------------------------------------------

ODD = b"".join(
    [
        b"From: odd@example.org\nSubject: odd bytes\n\n",
        b"bare LF line\n",
        b"CRLF line\r\n",
        b"NUL \x00 byte and \xff\xfe 8-bit\n",
        b".\n",  # a lone dot: must not end the message
        b"..two dots\n",
        b".leading dot\n",
        b"lone CR \r inside a line\n",
        b"a" * (pop3_wire.READ_CHUNK - 1) + b"\r\n",  # CR ends one read, its LF starts the next
        b"." + b"b" * (pop3_wire.READ_CHUNK + 10) + b"\n",  # dot-stuffed, longer than one read
        b"c" * (3 * 1024 * 1024) + b"\n",  # a 3 MB single line
        b"no final newline",
    ]
)
ODD_MESSAGES = [
    ODD,
    b"Subject: only headers, no body, no newline",
    b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n",
    b"\x00\x00\x00",
]


async def test_odd_messages_are_stored_byte_exact(store: Store, pop3d: Pop3d) -> None:
    server = await pop3d([mailbox(ODD_MESSAGES)])
    reference = sorted(
        await asyncio.to_thread(poplib_digests, HOST, server.port, USER, PASSWORD, 10)
    )
    result = await fetch(account(server.port, timeout=5.0), store)
    assert result.status == "ok" and result.new == len(ODD_MESSAGES), result
    assert result.bytes == sum(len(served(m)) for m in ODD_MESSAGES)
    assert server.errors == []
    assert reference == expected(ODD_MESSAGES)  # our reference agrees with poplib's
    assert await stored_hashes(store) == reference


async def test_an_empty_message_is_stored_as_zero_bytes(store: Store, pop3d: Pop3d) -> None:
    server = await pop3d([mailbox([b"", message(1)])])
    result = await fetch(account(server.port), store)
    assert result.status == "ok" and result.new == 2, result
    assert server.errors == []
    assert await stored_hashes(store) == expected([b"", message(1)])


_LINE = st.one_of(
    st.binary(max_size=24),
    st.lists(st.sampled_from([b".", b"\r", b"x", b"\x00", b"\xff"]), max_size=12).map(b"".join),
).map(lambda line: line.replace(b"\n", b""))
_LINES = st.lists(st.tuples(_LINE, st.sampled_from([b"\r\n", b"\n"])), max_size=25)


def _wire(lines: list[tuple[bytes, bytes]]) -> bytes:
    """The multi-line body as a server sends it: dot-stuffed, then the "." terminator."""
    body = b"".join((b"." if line.startswith(b".") else b"") + line + end for line, end in lines)
    return body + b".\r\n"


def _normalised(lines: list[tuple[bytes, bytes]]) -> bytes:
    """Each line as received, its line end (LF or CRLF) made CRLF."""
    return b"".join((line + end)[:-1].removesuffix(b"\r") + b"\r\n" for line, end in lines)


@settings(max_examples=1000, deadline=None)
@given(lines=_LINES, chunk=st.integers(min_value=3, max_value=16), data=st.data())
def test_stream_body_unstuffs_and_normalises_any_split(
    lines: list[tuple[bytes, bytes]], chunk: int, data: st.DataObject
) -> None:
    wire = _wire(lines)
    truncated = data.draw(st.booleans(), label="truncated")
    if truncated:
        wire = wire[: data.draw(st.integers(0, len(wire) - 3), label="cut")]  # no terminator
    out: list[bytes] = []
    # A socket file as makefile() gives it; its buffer decides which lines arrive together.
    buffer = data.draw(st.integers(min_value=1, max_value=64), label="buffer")
    trailer = data.draw(st.binary(max_size=8), label="next reply") if not truncated else b""
    file = io.BufferedReader(io.BytesIO(wire + trailer), buffer_size=buffer)
    fake = cast(Any, SimpleNamespace(file=file))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pop3_wire, "READ_CHUNK", chunk)
        if truncated:
            with pytest.raises(TemporaryError):
                pop3_wire.stream_body(fake, out.append)
            assert _normalised(lines).startswith(b"".join(out).removesuffix(b"\r"))
        else:
            pop3_wire.stream_body(fake, out.append)
            assert b"".join(out) == _normalised(lines)
            assert fake.file.read() == trailer  # stopped exactly after the terminator
    # Memory stays bounded: pieces are gathered up to one chunk, plus the line that passes it.
    assert all(len(piece) <= 2 * chunk + 1 for piece in out)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*certificate)
    return ctx


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_self_signed_certificate_needs_its_ca_file(
    store: Store, certificate: tuple[Path, Path], security: str, pop3d: Pop3d
) -> None:
    ctx = server_context(certificate)
    implicit = security == "tls"
    server = await pop3d([mailbox(MESSAGES)], ssl_context=ctx, implicit_tls=implicit)
    rejected = await fetch(account(server.port, security=security), store)
    assert_failed(rejected, "tls_failed")
    assert "certificate" in (rejected.error or "")
    assert server.commands_seen("USER") == 0 and server.login_attempts == 0

    trusted = account(server.port, security=security, ca_file=certificate[0])
    accepted = await fetch(trusted, store)
    assert accepted.status == "ok" and accepted.new == len(MESSAGES), accepted
    assert server.login_attempts == accepted.sessions
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


async def test_starttls_without_stls_offered_never_sends_the_password(store: Store) -> None:
    async with Pop3TestServer([mailbox(MESSAGES)]) as server:  # no ssl_context: CAPA has no STLS
        result = await fetch(account(server.port, security="starttls"), store)
        assert_failed(result, "tls_failed")
        assert "STLS" in (result.error or "")
        assert server.commands_seen("USER") == 0 and server.commands_seen("PASS") == 0
        assert server.login_attempts == 0
        assert server.errors == []
    assert await stored_hashes(store) == []


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_a_drop_under_tls_is_temporary_not_a_tls_failure(
    store: Store, certificate: tuple[Path, Path], security: str, pop3d: Pop3d
) -> None:
    """The peer's TLS EOF (often seen on the next pipelined write) is a drop like any other."""
    messages = [message(i) + b"filler line\n" * 2000 for i in range(1, 41)]
    faults = first_session(Faults(drop_mid_retr=20))
    ctx = server_context(certificate)
    implicit = security == "tls"
    server = await pop3d([mailbox(messages)], faults, ssl_context=ctx, implicit_tls=implicit)
    acc = account(server.port, security=security, ca_file=certificate[0], leave_on_server=False)
    first = await fetch(acc, store)
    assert_failed(first, "temp_failed")
    # What arrived whole is committed: a prefix of 1..19 (a reset may cut buffered data).
    kept = len(await stored_hashes(store))
    assert kept <= 19 and await stored_hashes(store) == expected(messages[:kept])
    assert server.mailbox(USER).remaining() == len(messages)

    second = await fetch(acc, store)
    assert second.status == "ok" and second.new == len(messages) - kept, second
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(messages)


_HANDSHAKE_FAULTS = [
    pytest.param(security, how, status, id=f"{security}-{how}")
    for security in ("tls", "starttls")
    for how, status in (
        ("drop", "temp_failed"),
        ("reset", "temp_failed"),
        ("garbage", "tls_failed"),
    )
]


@pytest.mark.parametrize(("security", "how", "status"), _HANDSHAKE_FAULTS)
async def test_broken_tls_handshake_is_typed_sends_no_password_and_touches_nothing(
    store: Store,
    certificate: tuple[Path, Path],
    security: str,
    how: Literal["drop", "reset", "garbage"],
    status: str,
    pop3d: Pop3d,
) -> None:
    """The server accepts TCP (tls) or answers +OK to STLS (starttls), then breaks the
    handshake: a close or reset is a drop, transient (temp_failed, 75, as the contract's "TLS
    handshake reset"); non-TLS bytes fail the handshake itself (tls_failed, 69)."""
    broken = Faults(tls_handshake=how)
    faults = Faults(per_session=lambda n: broken if n < 2 else Faults())
    ctx = server_context(certificate)
    implicit = security == "tls"
    server = await pop3d([mailbox(MESSAGES)], faults, ssl_context=ctx, implicit_tls=implicit)
    acc = account(server.port, security=security, ca_file=certificate[0], leave_on_server=False)
    session = Pop3Session(acc.pop3_login())
    with pytest.raises(TemporaryError if status == "temp_failed" else TLSError) as caught:
        await asyncio.to_thread(session.connect)
    assert caught.value.account == NAME and session.broken
    await asyncio.to_thread(session.close)

    result = await fetch(acc, store)
    assert_failed(result, status)
    assert STATUS_EXIT[result.status] == (
        EX_TEMPFAIL if status == "temp_failed" else EX_UNAVAILABLE
    )
    assert result.new == 0 and result.deleted == 0
    for number in (0, 1):
        assert server.session_log(number) == ([] if implicit else ["CAPA", "STLS"])
    assert server.login_attempts == 0
    assert await stored_hashes(store) == []
    assert server.mailbox(USER).remaining() == len(MESSAGES)

    again = await fetch(acc, store)  # the handshake works again: everything, once
    assert again.status == "ok" and again.new == len(MESSAGES), again
    assert server.mailbox(USER).remaining() == 0
    assert server.errors == []
    assert await stored_hashes(store) == expected(MESSAGES)


def test_fetch_cli_reports_each_broken_handshake_and_exits_with_the_worst(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    """A plaintext server on the TLS port (69) and a drop after STLS (75), in one `fetch`."""
    ctx = server_context(certificate)
    garbage = ThreadedPop3Server(
        [mailbox(MESSAGES)], Faults(tls_handshake="garbage"), ssl_context=ctx, implicit_tls=True
    )
    dropped = ThreadedPop3Server([mailbox(MESSAGES)], Faults(tls_handshake="drop"), ssl_context=ctx)
    with garbage, dropped:
        common: dict[str, Any] = {"owner": OWNER, "host": HOST, "username": USER}
        common |= {"password": PASSWORD, "ca_file": str(certificate[0]), "timeout": "5s"}
        common["leave_on_server"] = False
        config = write_config(
            tmp_path,
            [
                {"name": "pop3s", "port": garbage.port, "security": "tls", **common},
                {"name": "stls", "port": dropped.port, "security": "starttls", **common},
            ],
        )
        proc = run_cli(config, "fetch", "--json")
        for server in (garbage.server, dropped.server):
            assert server.login_attempts == 0 and server.errors == []
            assert server.mailbox(USER).remaining() == len(MESSAGES)
    assert proc.returncode == EX_UNAVAILABLE, proc.stderr.decode()
    results = {r["account"]: r for r in json.loads(proc.stdout)["accounts"]}
    assert results["pop3s"]["status"] == "tls_failed"
    assert results["pop3s"]["error"].startswith("account 'pop3s': TLS failed")
    assert results["stls"]["status"] == "temp_failed"
    assert results["stls"]["error"].startswith("account 'stls': connection lost during stls")
    for result in results.values():
        assert result["new"] == 0 and result["deleted"] == 0
    assert b"Traceback" not in proc.stderr
    assert run_sql(tmp_path / "mail.db", "SELECT count(*) FROM messages") == [(0,)]

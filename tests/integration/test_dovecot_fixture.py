"""The Dovecot fixture serves POP3 as the other tests assume, checked with plain poplib."""

from __future__ import annotations

import poplib
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dovecot import DEFAULT_UIDL_FORMAT, Dovecot, DovecotMissing, Mailbox

MESSAGES = [
    b"From: a@example.com\r\nSubject: one\r\n\r\nfirst body\r\n",
    b"From: b@example.com\nSubject: two\n\nLF only\n.leading dot\n",
    b"From: c@example.com\r\nSubject: three\r\n\r\nno final newline",
]


def crlf(raw: bytes) -> bytes:
    """What a POP3 server sends for `raw`: CRLF line ends, ending in CRLF."""
    text = re.sub(rb"\r?\n", b"\r\n", raw)
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def tls_context(dovecot: Dovecot) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dovecot.cert_path))


@contextmanager
def session(
    dovecot: Dovecot, user: str, password: str, *, mode: str = "plain"
) -> Iterator[poplib.POP3]:
    """A logged-in POP3 session: "plain", "stls" or "pop3s"; QUIT (or close) on exit."""
    if mode == "pop3s":
        pop: poplib.POP3 = poplib.POP3_SSL(
            dovecot.host, dovecot.ssl_port, timeout=10, context=tls_context(dovecot)
        )
    else:
        pop = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        if mode == "stls":
            pop.stls(context=tls_context(dovecot))
        pop.user(user)
        pop.pass_(password)
        yield pop
        pop.quit()
    finally:
        pop.close()


def uidls(pop: poplib.POP3) -> list[bytes]:
    _, lines, _ = pop.uidl()
    return [line.split()[1] for line in lines]


def test_missing_binary_raises_dovecot_missing_not_skip(tmp_path: Path) -> None:
    with pytest.raises(DovecotMissing, match="install dovecot-pop3d"):
        Dovecot(tmp_path, binary="no-such-dovecot-binary")


@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_login_lists_delivered_messages(mailbox: Mailbox, mode: str) -> None:
    mailbox.deliver_many(MESSAGES)
    with session(mailbox.dovecot, mailbox.user, mailbox.password, mode=mode) as pop:
        assert pop.stat()[0] == len(MESSAGES)
        if mode != "plain":
            assert isinstance(pop.sock, ssl.SSLSocket)


def test_capabilities_are_dovecot_defaults(mailbox: Mailbox) -> None:
    dovecot = mailbox.dovecot
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=10)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        before_login = pop.capa()
        pop.quit()
    finally:
        pop.close()
    with session(dovecot, mailbox.user, mailbox.password) as pop:
        after_login = pop.capa()
    # USER, STLS and SASL are offered only before login (RFC 2449).
    assert {"USER", "STLS", "SASL", "UIDL", "TOP", "PIPELINING", "RESP-CODES"} <= set(before_login)
    assert {"UIDL", "TOP", "PIPELINING", "RESP-CODES"} <= set(after_login)
    assert "USER" not in after_login


def test_recent_prefixed_login_sees_the_same_messages(mailbox: Mailbox) -> None:
    mailbox.deliver_many(MESSAGES)
    with session(mailbox.dovecot, mailbox.user, mailbox.password) as pop:
        plain = uidls(pop)
    with session(mailbox.dovecot, mailbox.recent_user, mailbox.password) as pop:
        assert uidls(pop) == plain
        assert len(plain) == len(MESSAGES)


def test_retr_returns_delivered_bytes_crlf_normalised(mailbox: Mailbox) -> None:
    mailbox.deliver_many(MESSAGES)
    with session(mailbox.dovecot, mailbox.user, mailbox.password) as pop:
        for number, raw in enumerate(MESSAGES, start=1):
            _, lines, _ = pop.retr(number)
            assert b"\r\n".join(lines) + b"\r\n" == crlf(raw)


def test_dele_and_quit_remove_messages_from_the_maildir(mailbox: Mailbox) -> None:
    mailbox.deliver_many(MESSAGES)
    assert mailbox.count() == 3
    with session(mailbox.dovecot, mailbox.user, mailbox.password) as pop:
        pop.dele(1)
        pop.dele(3)
    assert mailbox.count() == 1


def test_wrong_password_counts_exactly_one_mismatch(mailbox: Mailbox) -> None:
    with pytest.raises(poplib.error_proto, match="AUTH"):
        with session(mailbox.dovecot, mailbox.user, "wrong-password"):
            pass
    assert mailbox.dovecot.password_mismatches(mailbox.user) == 1


def test_unknown_user_counts_as_a_mismatch(dovecot: Dovecot) -> None:
    with pytest.raises(poplib.error_proto, match="AUTH"):
        with session(dovecot, "nobody-here", "whatever"):
            pass
    assert dovecot.password_mismatches("nobody-here") == 1


def test_set_password_takes_effect_at_once(mailbox: Mailbox) -> None:
    with session(mailbox.dovecot, mailbox.user, mailbox.password):
        pass
    # Same length as the old one: only the mtime tells Dovecot the file changed.
    new = mailbox.password.replace("Zq9", "Xy8")
    mailbox.dovecot.set_password(mailbox.user, new)
    with session(mailbox.dovecot, mailbox.user, new):
        pass
    with session(mailbox.dovecot, mailbox.recent_user, new):
        pass


def test_restart_with_new_uidl_format_renumbers_but_keeps_messages(mailbox: Mailbox) -> None:
    dovecot = mailbox.dovecot
    mailbox.deliver_many(MESSAGES)
    with session(dovecot, mailbox.user, mailbox.password) as pop:
        before = uidls(pop)
    try:
        dovecot.restart(uidl_format="%v-%u")
        with session(dovecot, mailbox.user, mailbox.password) as pop:
            after = uidls(pop)
            bodies = [b"\r\n".join(pop.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)]
    finally:
        dovecot.restart(uidl_format=DEFAULT_UIDL_FORMAT)
    assert len(after) == len(before) == 3
    assert set(after).isdisjoint(before)
    assert all(re.fullmatch(rb"\d+-\d+", uidl) for uidl in after)
    assert bodies == [crlf(raw) for raw in MESSAGES]


def test_message_with_a_100_kb_line_is_served_whole(
    mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    mailbox.deliver(raw)
    monkeypatch.setattr(poplib, "_MAXLINE", 200_000)  # poplib refuses lines over 2048 bytes
    with session(mailbox.dovecot, mailbox.user, mailbox.password) as pop:
        _, lines, _ = pop.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == raw

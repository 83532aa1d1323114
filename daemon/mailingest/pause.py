"""The auth pause: a login the server rejected is not tried again until the login changes.

Mail providers lock mailboxes that keep retrying a bad password, so one rejection pauses
the account, for the daemon and the one-shot ``fetch`` alike. The pause remembers the
rejected login as a salted scrypt hash (never the password itself) in the store, so a
restarted daemon or the next timer-driven ``fetch`` stays paused too, and any process on
the database can tell whether its own config brings another login.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os

from mailingest.config import Account
from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.model import Status
from mailingest.store import Store

log = get_logger("mailingest.pause")

#: Why an account is paused (``pause_reason`` in ``status``, ``reason`` of ``account_paused``).
REASON = Status.AUTH_FAILED.value
#: Why a paused account resumes: its config brings another login than the rejected one.
CREDENTIALS_CHANGED = "credentials_changed"
#: Why a paused OAuth2 account resumes in the daemon: `mailingest auth login` ended the
#: pause in the store.
LIFTED = "pause_lifted"
#: Why a paused account resumes: `mailingest auth login` stored a new refresh token.
SIGNED_IN = "signed_in"

_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def rejected(status: Status) -> bool:
    """Whether a poll that ended in ``status`` had its login rejected: the pause begins."""
    return status is Status.AUTH_FAILED


def login_key(account: Account, *, salt: bytes | None = None) -> str:
    """``scrypt$<salt>$<hash>`` of the account's login (CPU-bound: call it in a thread)."""
    salt = os.urandom(16) if salt is None else salt  # secrets.token_bytes, minus random
    digest = hashlib.scrypt(account.login_bytes(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def same_login(key: str, account: Account) -> bool:
    """Whether ``account`` would log in exactly as the login that ``key`` was made from."""
    scheme, _, rest = key.partition("$")
    salt_hex, _, _ = rest.partition("$")
    if scheme != "scrypt":
        return False
    try:
        salt = bytes.fromhex(salt_hex)
    except ValueError:
        return False
    return hmac.compare_digest(login_key(account, salt=salt), key)


async def key_of(account: Account) -> str:
    """The pause key of ``account``'s login (scrypt, so in a worker thread)."""
    return await asyncio.to_thread(login_key, account)


async def may_retry(key: str, account: Account) -> bool:
    """Whether an account paused under ``key`` may log in again: only with another login
    than the rejected one (a new password, user or server)."""
    return not await asyncio.to_thread(same_login, key, account)


async def record(store: Store, account: str, key: str, *, announce: bool = True) -> bool:
    """Save the pause (no next poll until it ends); ``announce``: log ``account_paused``,
    once it is saved, so whoever reacts to the line sees it in ``status``. A store error
    is logged: the pause then holds in this process only (False)."""
    saved = True
    try:
        await store.set_paused(account, REASON, key)
    except StoreError as exc:
        log.error("state_not_recorded", account=account, error=str(exc))
        saved = False
    if announce:
        log.warning("account_paused", account=account, reason=REASON)
    return saved


async def resume(
    store: Store, account: str, reason: str = CREDENTIALS_CHANGED, *, announce: bool = True
) -> None:
    """End the pause (``announce``: log ``account_resumed`` with ``reason``)."""
    if announce:
        log.info("account_resumed", account=account, reason=reason)
    try:
        await store.clear_pause(account)
    except StoreError as exc:
        log.error("state_not_recorded", account=account, error=str(exc))


__all__ = [
    "CREDENTIALS_CHANGED",
    "LIFTED",
    "REASON",
    "SIGNED_IN",
    "key_of",
    "login_key",
    "may_retry",
    "record",
    "rejected",
    "resume",
    "same_login",
]

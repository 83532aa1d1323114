"""What each CLI command does, as async functions over a config and a store.

cli.py parses and prints; these functions do the work and return plain data.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mailingest import crm, pause, signin
from mailingest.accounts import with_stored
from mailingest.config import Account, Config
from mailingest.errors import DataError, MailIngestError, PermissionDenied, UsageError
from mailingest.fetch import FetchResult, fetch_account
from mailingest.logs import get_logger, mask_text, register_secrets
from mailingest.model import AccountState, Pop3Login, Record, Status, StoredMessage
from mailingest.pop3 import Pop3Session
from mailingest.progress import Progress
from mailingest.sharing import may_see
from mailingest.store import Store

T = TypeVar("T")
log = get_logger("mailingest.commands")


def select_accounts(config: Config, names: Sequence[str] | None) -> list[Account]:
    """The accounts named on the command line (all when none), in config order."""
    if not names:
        return list(config.accounts)
    known = {a.name: a for a in config.accounts}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"unknown account {', '.join(map(repr, unknown))}; "
            f"configured: {', '.join(known) or '(none)'}"
        )
    return [known[n] for n in dict.fromkeys(names)]


@contextlib.asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[Store]:
    """The store, with stored mail re-tagged first if an account's sharing settings changed."""
    storage = config.storage
    store = await Store.open(storage.database, password=storage.reveal_password())
    try:
        await crm.sync_settings(store, config)
        yield store
    finally:
        await store.close()


def size_executor(concurrency: int) -> None:
    """One worker thread per concurrent POP3 session, plus a few for parsing."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=concurrency + 4))


async def bounded(limit: int, jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run jobs concurrently, at most ``limit`` at once, results in input order."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def fetch(
    config: Config,
    names: Sequence[str] | None,
    *,
    progress: Progress | None = None,
    stored: bool = False,
) -> list[FetchResult]:
    """One cycle for each selected account. ``stored``: the database's accounts too, read
    from the same opening of the store (the CLI's: a second opening cost a one-shot fetch
    a few milliseconds of its start)."""
    limit = config.daemon.max_concurrent
    size_executor(limit)
    storage = config.storage
    store = await Store.open(storage.database, password=storage.reveal_password())
    try:
        if stored:
            config = (await with_stored(store, config))[1]
            register_secrets(config.secrets())
        accounts = select_accounts(config, names)
        await crm.sync_settings(store, config)
        states = await store.account_states(counts=False)
        return await bounded(
            limit,
            [
                functools.partial(
                    _one_shot,
                    a,
                    store,
                    states.get(a.name),
                    max_sessions=config.daemon.max_sessions_per_cycle,
                    progress=progress,
                )
                for a in accounts
            ],
        )
    finally:
        await store.close()


async def _one_shot(
    account: Account,
    store: Store,
    state: AccountState | None,
    *,
    max_sessions: int,
    progress: Progress | None,
) -> FetchResult:
    """A cycle that honours the auth pause, as the daemon does (see pause.py).

    A timer-driven `fetch` must not log in with a password the server already rejected
    (providers lock mailboxes that keep trying): a paused account whose login is unchanged
    is reported without a login; a new rejection pauses it; a success clears the pause.
    The daemon's pause events (`account_paused`, `account_resumed`) are not logged here.
    """
    if state is not None and state.paused and state.pause_key:
        if not await pause.may_retry(state.pause_key, account):
            return FetchResult(
                account=account.name,
                status=Status.AUTH_FAILED,
                error=f"account {account.name!r}: paused since the server rejected this "
                "login; no login attempted. "
                + (
                    f"Sign in again (mailingest auth login --account {account.name}) or "
                    "change its auth settings."
                    if account.auth is not None
                    else "Put the new password in the config."
                ),
            )
    result = await fetch_account(account, store, max_sessions=max_sessions, progress=progress)
    # Logged as the daemon logs them: a timer-driven `fetch` is watched by its log too.
    if pause.rejected(result.status):
        key = await pause.key_of(account)
        await pause.record(store, account.name, key)
    elif result.status is Status.OK and state is not None and state.paused:
        await pause.resume(store, account.name)
    return result


def check_pop3(account: Account, login: Pop3Login | None = None) -> dict[str, Any]:
    """Worker-thread side of `check`: connect, TLS, login, STAT; nothing changed."""
    session = Pop3Session(login or account.pop3_login())
    failed: dict[str, Any] = {"capabilities": [], "messages": None, "mechanism": None}
    try:
        session.connect()
        count, _ = session.stat()
        caps = session.capabilities.listing()
        session.quit()
    except MailIngestError as exc:
        return {"status": exc.status, "error": str(exc), **failed}
    except Exception as exc:  # a bug in one account's check must not hide the others'
        error = mask_text(f"account {account.name!r}: internal error: {type(exc).__name__}: {exc}")
        return {"status": Status.ERROR, "error": error, **failed}
    finally:
        session.close()
    return {
        "status": Status.OK,
        "error": None,
        "capabilities": caps,
        "messages": count,
        "mechanism": session.mechanism,
    }


async def check_pop3_with(account: Account, store: Store | None) -> dict[str, Any]:
    """The POP3 check; an OAuth2 account's token request is reported apart from its login."""
    if account.auth is None or store is None:
        pop3 = await asyncio.to_thread(check_pop3, account)
        return {**pop3, "token": None}
    try:
        login, refreshed = await signin.pop3_login(account, store)
    except MailIngestError as exc:
        token = {"status": exc.status, "error": mask_text(str(exc)), "refreshed": False}
        failed: dict[str, Any] = {"capabilities": [], "messages": None, "mechanism": None}
        return {"status": exc.status, "error": token["error"], **failed, "token": token}
    pop3 = await asyncio.to_thread(check_pop3, account, login)
    return {**pop3, "token": {"status": Status.OK, "error": None, "refreshed": bool(refreshed)}}


async def _check_smtp(account: Account, store: Store | None) -> dict[str, Any] | None:
    """SMTP login apart from POP3: after a password change, which of the two is still wrong."""
    if account.smtp is None:
        return None
    from mailingest import smtp  # aiosmtplib only where SMTP is configured

    try:
        token = None
        if account.smtp.auth is not None:
            assert store is not None  # check() opens it for OAuth2 accounts
            token = await signin.smtp_token(account.smtp, account.name, store)
        await smtp.check_login(account.smtp, account.name, token)
    except MailIngestError as exc:  # the server's reply is quoted: mask what it may echo
        return {"status": exc.status, "error": mask_text(str(exc))}
    return {"status": Status.OK, "error": None}


async def check(config: Config, names: Sequence[str] | None) -> list[dict[str, Any]]:
    accounts = select_accounts(config, names)
    size_executor(config.daemon.max_concurrent)

    oauth2 = any(a.auth or (a.smtp and a.smtp.auth) for a in accounts)

    async def run(store: Store | None) -> list[dict[str, Any]]:
        jobs = [functools.partial(check_one, a, store) for a in accounts]
        return await bounded(config.daemon.max_concurrent, jobs)

    if not oauth2:  # a password check touches no store
        return await run(None)
    async with open_store(config) as store:  # OAuth2 refresh tokens live there
        return await run(store)


async def check_one(account: Account, store: Store | None) -> dict[str, Any]:
    """`check --json`'s entry for one account: POP3, then SMTP apart (``store``: where
    OAuth2 refresh tokens live; None will do for password accounts)."""
    pop3 = await check_pop3_with(account, store)
    smtp = await _check_smtp(account, store)
    return {"account": account.name, "pop3": pop3, "smtp": smtp}


async def status(config: Config) -> list[dict[str, Any]]:
    async with open_store(config) as store:
        return await status_of(store, config)


async def status_of(store: Store, config: Config) -> list[dict[str, Any]]:
    """`status --json`'s accounts, from an open store (the API's GET /accounts too)."""
    states = await store.account_states()
    out = []
    for account in config.accounts:
        state = states.get(account.name)
        stored = state.stored if state else await store.stored_count(account.name)
        out.append(
            {
                "account": account.name,
                "owner": account.owner,
                "last_poll": state.last_poll if state else None,
                "result": state.result if state else None,
                "error": state.error if state else None,
                "new": state.new if state else 0,
                "stored": stored,
                "paused": state.paused if state else False,
                "pause_reason": state.pause_reason if state else None,
                "next_poll": state.next_poll if state else None,
                "consecutive_failures": state.consecutive_failures if state else 0,
                "next_login": state.next_login if state else None,
            }
        )
    return out


async def messages(
    config: Config,
    viewer: str,
    *,
    account: str | None = None,
    label: str | None = None,
    record: str | None = None,
    limit: int | None = None,
    quarantined: bool = False,
) -> list[StoredMessage]:
    if account is not None:
        select_accounts(config, [account])
    async with open_store(config) as store:
        return await store.messages(
            viewer,
            account=account,
            label=label,
            record=record,
            limit=limit,
            quarantined=quarantined,
        )


async def show(
    config: Config, message_id: int, viewer: str, *, raw_sink: Callable[[bytes], object] | None
) -> StoredMessage:
    """One message if ``viewer`` may see it; with ``raw_sink`` its exact bytes stream out."""
    async with open_store(config) as store:
        message = await store.message(message_id)
        if message is None or not may_see(viewer, message.owner, message.visibility):
            # The same answer for "absent" and "not yours": no probing for message ids.
            raise PermissionDenied(
                f"message {message_id} does not exist or {viewer!r} may not see it"
            )
        if raw_sink is not None:
            async for chunk in store.raw_chunks(message_id):
                raw_sink(chunk)
        return message


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


async def records_import(config: Config, text: str, source: str) -> int:
    """Validate the whole CSV, then upsert it in one transaction (nothing half-imported)."""
    records = crm.parse_records_csv(text, source)
    async with open_store(config) as store:
        return await store.import_records(records, crm.policies(config))


async def records_list(config: Config) -> list[Record]:
    async with open_store(config) as store:
        return await store.records()


async def records_set_email(config: Config, record: str, emails: str) -> tuple[str, ...]:
    addresses, bad = crm.parse_emails(emails)
    if bad or not addresses:
        raise DataError(f"not an address: {', '.join(map(repr, bad)) or repr(emails)}")
    async with open_store(config) as store:
        if not await store.set_record_emails(record, addresses, crm.policies(config)):
            raise UsageError(f"no record {record!r}; see `mailingest records list`")
    return addresses


async def records_share(
    config: Config, record: str, owner: str, on: bool, actor: str | None = None
) -> list[str]:
    """Set the flag; returns notes on the owner's accounts where it has no effect.

    Refused for an owner whose accounts are all public: the CRM hides the share checkbox
    there, and a flag stored now would change who sees their mail silently, on a later
    switch to custom mode. Clearing one is always allowed."""
    check_share(config, owner, on)
    async with open_store(config) as store:
        who = actor or crm.current_actor()
        if not await store.set_share(owner, record, on, crm.policies(config), actor=who):
            raise UsageError(f"no record {record!r}; see `mailingest records list`")
    return share_notes(config, owner)


def check_share(config: Config, owner: str, on: bool) -> None:
    """Refuse a share flag for an owner whose accounts are all public (see records_share)."""
    mine = [a for a in config.accounts if a.owner == owner]
    if on and mine and all(a.sharing == "public" for a in mine):
        names = ", ".join(repr(a.name) for a in mine)
        raise DataError(
            f"{owner!r} shares every account with everyone (public: {names}); share flags "
            'apply only with sharing = "custom"; nothing changed'
        )


def share_notes(config: Config, owner: str) -> list[str]:
    """The owner's accounts where a share flag has no effect."""
    return [
        f"account {a.name!r} of {owner!r} is in {a.sharing} mode: the share flag has no "
        'effect there (it matters only with sharing = "custom")'
        for a in config.accounts
        if a.owner == owner and a.sharing != "custom"
    ]

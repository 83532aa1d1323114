"""Glue between config, CRM records and the store: policies per account, CSV import rules."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import unicodedata
from collections.abc import Collection, Mapping

from mailingest.config import Account, Config
from mailingest.errors import DataError
from mailingest.matching import normalize, normalize_domain
from mailingest.model import AccountPolicy, Record
from mailingest.sharing import Policy, decide
from mailingest.store import Store

KINDS = ("lead", "contact")
#: The longest record id the API takes (characters): room for any CRM's keys, not more.
MAX_RECORD_ID = 200
CSV_HEADER = ["id", "kind", "email", "name"]


def account_policy(account: Account) -> AccountPolicy:
    # Stored addresses carry their domains in IDNA form; so must the excluded ones, or
    # `excluded_domains = ["müller.example"]` would never match mail from that domain.
    excluded = tuple(normalize_domain(d) or d for d in account.excluded_domains)
    policy = Policy(sharing=account.sharing, excluded_domains=excluded)
    return AccountPolicy(
        tagger=functools.partial(decide, policy), magnet_label=account.magnet_label
    )


def policies(config: Config) -> dict[str, AccountPolicy]:
    return {a.name: account_policy(a) for a in config.accounts}


def settings_snapshot(account: Account) -> str:
    """What tagging depends on; a change of it re-tags the account's stored mail."""
    return json.dumps(
        {
            "owner": account.owner,
            "sharing": account.sharing,
            "excluded_domains": sorted(account.excluded_domains),
        },
        sort_keys=True,
    )


def tagging(account: Account) -> tuple[str, str | None]:
    """Everything the tags and labels of the account's stored mail depend on."""
    return settings_snapshot(account), account.magnet_label


async def sync_settings(
    store: Store,
    config: Config,
    accounts: Collection[str] | None = None,
    *,
    force: Collection[str] = (),
    actor: str | None = None,
    actors: Mapping[str, str] | None = None,
) -> list[str]:
    """Re-tag (and re-label) the stored mail of accounts whose sharing settings differ from
    the persisted snapshot, all in one transaction; the accounts it re-tagged.

    Every start goes through here: each CLI command, the daemon's start and its reloads.
    ``accounts`` limits it to those names (default: every configured account); ``force``
    re-tags those even where the snapshot already matches (see Store.retag_changed).
    The audit log names ``actors[name]`` for a change of that account, else ``actor``.
    """
    chosen = [a for a in config.accounts if accounts is None or a.name in accounts]
    if not chosen:
        return []
    return await store.retag_changed(
        {a.name: settings_snapshot(a) for a in chosen},
        policies(config),
        force,
        actor=actor or current_actor(),
        actors=actors,
    )


def current_actor() -> str:
    """Who is changing things, for the audit log: the login behind sudo, else this user as
    getpass.getuser finds it (read here: getpass imports termios, at every command's start)."""
    for name in ("SUDO_USER", "LOGNAME", "USER", "LNAME", "USERNAME"):
        if user := os.environ.get(name):
            return user
    with contextlib.suppress(KeyError, OSError):
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    return f"uid {os.getuid()}"


def parse_emails(text: str) -> tuple[tuple[str, ...], list[str]]:
    """Normalised addresses from ``a@x;b@y``, and the parts that are not addresses."""
    good: dict[str, None] = {}
    bad: list[str] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        norm = normalize(part)
        if norm is None:
            bad.append(part)
        else:
            good.setdefault(norm)
    return tuple(good), bad


def record_id_problem(record_id: str) -> str | None:
    """Why ``record_id`` is no record id the API takes (None: it is one): blank, over
    MAX_RECORD_ID characters, or holding a control character or line break (a log line,
    a CSV export or a terminal would show it as something else)."""
    if not record_id.strip():
        return "an empty record id"
    if len(record_id) > MAX_RECORD_ID:
        return f"a record id of {len(record_id)} characters; at most {MAX_RECORD_ID}"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in record_id):
        return "a control character or line break in the record id"
    return None


def parse_records_csv(text: str, source: str) -> list[Record]:
    """Validate a whole CSV first: any bad row rejects the import, naming every bad line."""
    import csv  # `records import` only

    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != CSV_HEADER:
        raise DataError(f"{source}: line 1: expected the header {','.join(CSV_HEADER)}")
    problems: list[str] = []
    records: dict[str, Record] = {}
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise DataError(f"{source}: line {reader.line_num}: {exc}; nothing imported") from exc
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(CSV_HEADER):
            problems.append(f"line {line}: expected 4 fields, got {len(row)}")
            continue
        rid, kind, emails, name = (cell.strip() for cell in row)
        errors = []
        if not rid:
            errors.append("empty id")
        if kind.lower() not in KINDS:
            errors.append(f"unknown kind {kind!r} (lead or contact)")
        addresses, bad = parse_emails(emails)
        if bad:
            errors.append(f"unparseable address {', '.join(map(repr, bad))}")
        elif not addresses:
            errors.append("no email address")
        if errors:
            problems.append(f"line {line}: {'; '.join(errors)}")
            continue
        records[rid] = Record(rid, kind.lower(), name, addresses)
    if problems:
        raise DataError(f"{source}: nothing imported; " + "; ".join(problems))
    return list(records.values())

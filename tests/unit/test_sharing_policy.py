"""The sharing table row by row, address matching, and a model-based property test of the store.

The expectations here are written from ARCHITECTURE.md ("Sharing (visibility) rules",
"Matching", "Email Magnet"), not from sharing.py: the property test's model has its own
address keys, its own domain rule and its own table, and never calls `sharing.decide`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import builders
from builders import literal
from mailingest import crm, retrieval
from mailingest.config import Account, Config, DaemonSettings, StorageSettings
from mailingest.errors import DataError
from mailingest.matching import (
    direction_of,
    domain_matches,
    link_addresses,
    normalize,
    normalize_all,
    normalize_domain,
)
from mailingest.model import AccountPolicy, Facts, Headers, NewMessage, Record
from mailingest.parse import parse_headers
from mailingest.sharing import Policy, decide, may_see
from mailingest.store import Store
from postgres import Postgres
from support import StoreAt

BASE_DATE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
OWN = "alice@own.example"

# --------------------------------------------------------------------------------------------
# Helpers: accounts, configs, messages as the fetch cycle prepares them
# --------------------------------------------------------------------------------------------


def account(
    name: str = "alice-mail",
    owner: str = "alice",
    identity: str = OWN,
    *,
    sharing: str = "private",
    excluded: Sequence[str] = (),
    label: str | None = None,
) -> Account:
    """An account as config.load_config builds it (excluded domains lower-cased there)."""
    return builders.account(
        110,
        name=name,
        owner=owner,
        username=identity,
        password=literal("not-used"),
        timeout=60.0,
        sharing=sharing,
        excluded_domains=tuple(excluded),
        magnet_label=label,
    )


def config_of(accounts: Sequence[Account], database: Path | str) -> Config:
    return Config(
        path=Path("mailingest.toml"),
        storage=StorageSettings(database=database),
        daemon=DaemonSettings(),
        accounts=tuple(accounts),
    )


def raw_message(
    n: int, sender: str, to: Sequence[str], cc: Sequence[str] = (), *, dated: bool = True
) -> bytes:
    lines = [f"From: {sender}", f"To: {', '.join(to)}"]
    if cc:
        lines.append(f"Cc: {', '.join(cc)}")
    lines.append(f"Subject: message {n}")
    if dated:
        lines.append(f"Date: {format_datetime(BASE_DATE + timedelta(minutes=n))}")
    lines += [f"Message-ID: <m{n}@test.example>", "", f"Body of message {n}.", ""]
    return "\r\n".join(lines).encode("utf-8")


@contextlib.contextmanager
def new_message(
    raw: bytes, acct: Account, uidl: str, *, origin: str = "pop3"
) -> Iterator[NewMessage]:
    """What the fetch cycle hands the store for ``raw``: retrieval.prepare of its spool file
    (closed at the end). A CRM-sent one (``origin="crm"``) is from the owner, so prepare
    finds it outgoing, as outgoing.py stores it; only its origin differs."""
    spool = retrieval.Spool(Path(tempfile.gettempdir()))
    try:
        spool.write(raw)
        spool.finish()
        item = retrieval.prepare(acct, 1, uidl, spool, None)
        if origin == "crm":
            assert item.direction == "out", "the CRM sends from the owner's address"
            item = dataclasses.replace(item, origin="crm")
        yield item
    finally:
        spool.discard()


@contextlib.asynccontextmanager
async def open_store(at: StoreAt) -> AsyncIterator[Store]:
    store = await at.open()
    try:
        yield store
    finally:
        await store.close()


async def store_one(
    store: Store, acct: Account, raw: bytes, n: int, *, origin: str = "pop3"
) -> int:
    with new_message(raw, acct, f"u{n}", origin=origin) as item:
        [outcome] = await store.add_batch(acct.name, acct.owner, [item], crm.account_policy(acct))
    assert outcome.message is not None
    return outcome.message


def policies(*accounts: Account) -> dict[str, AccountPolicy]:
    return {a.name: crm.account_policy(a) for a in accounts}


# --------------------------------------------------------------------------------------------
# The table, row by row
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of the sharing table with a message that lands in it.

    ``partners``: for received mail the sender (first) and other addresses on Cc; for mail
    the owner sent (fetched ``out`` or CRM-sent) the recipients. The first partner is the
    record's address when ``linked``.
    """

    mode: str
    origin: str  # in (received) | out (fetched, the owner sent it) | crm (send/reply)
    partners: tuple[str, ...]
    linked: bool
    shared: bool
    expected: tuple[str, str]
    excluded: tuple[str, ...] = ()


PRIVATE_ROWS = [
    Cell("private", "in", ("l@y.example",), True, False, ("private", "mode_private")),
    Cell("private", "in", ("l@y.example",), True, True, ("private", "mode_private")),
    Cell("private", "out", ("l@y.example",), True, True, ("private", "mode_private")),
    Cell("private", "crm", ("l@y.example",), True, False, ("private", "mode_private")),
    Cell("private", "crm", ("l@y.example",), True, True, ("private", "mode_private")),
    Cell("private", "in", ("l@y.example",), False, False, ("private", "unmatched")),
    Cell("private", "crm", ("l@y.example",), False, False, ("private", "unmatched")),
]
CUSTOM_ROWS = [
    Cell("custom", "in", ("l@y.example",), True, True, ("shared", "custom_shared")),
    Cell("custom", "in", ("l@y.example",), True, False, ("private", "custom_not_shared")),
    Cell("custom", "out", ("l@y.example",), True, True, ("shared", "custom_shared")),
    Cell("custom", "out", ("l@y.example",), True, False, ("private", "custom_not_shared")),
    Cell("custom", "crm", ("l@y.example",), True, False, ("shared", "crm_sent")),
    Cell("custom", "crm", ("l@y.example",), True, True, ("shared", "crm_sent")),
    Cell("custom", "in", ("l@y.example",), False, False, ("private", "unmatched")),
    Cell("custom", "crm", ("l@y.example",), False, False, ("private", "unmatched")),
]
X = ("x.example",)
PUBLIC_ROWS = [
    Cell("public", "in", ("l@y.example",), True, False, ("shared", "public"), X),
    Cell("public", "in", ("l@y.example",), True, False, ("shared", "public")),
    Cell("public", "in", ("l@x.example",), True, False, ("private", "excluded_domain"), X),
    Cell("public", "in", ("l@sub.x.example",), True, False, ("private", "excluded_domain"), X),
    Cell("public", "in", ("l@a.b.x.example",), True, False, ("private", "excluded_domain"), X),
    # A share flag never overrides an excluded domain.
    Cell("public", "in", ("l@x.example",), True, True, ("private", "excluded_domain"), X),
    # Only the sender counts for received mail; a domain merely ending in the text does not.
    Cell("public", "in", ("l@y.example", "c@x.example"), True, False, ("shared", "public"), X),
    Cell("public", "in", ("l@notx.example",), True, False, ("shared", "public"), X),
    Cell("public", "in", ("l@x.example.com",), True, False, ("shared", "public"), X),
    Cell("public", "crm", ("l@y.example",), True, False, ("shared", "crm_sent"), X),
    Cell(
        "public",
        "crm",
        ("l@y.example", "c@sub.x.example"),
        True,
        False,
        ("private", "excluded_domain"),
        X,
    ),
    Cell("public", "crm", ("l@x.example",), True, True, ("private", "excluded_domain"), X),
    # Fetched outgoing mail (recent: mode): the recipients are the partners (sharing.py).
    Cell("public", "out", ("l@y.example",), True, False, ("shared", "public"), X),
    Cell(
        "public",
        "out",
        ("l@y.example", "c@x.example"),
        True,
        False,
        ("private", "excluded_domain"),
        X,
    ),
    Cell("public", "in", ("l@x.example",), False, False, ("private", "unmatched"), X),
    Cell("public", "in", ("l@y.example",), False, False, ("private", "unmatched"), X),
    Cell("public", "crm", ("l@y.example",), False, False, ("private", "unmatched"), X),
    # One domain in Unicode (raw UTF-8 mail, RFC 6532) and in IDNA form (config or mail).
    Cell(
        "public",
        "in",
        ("Jürgen <jürgen@müller.example>",),
        True,
        False,
        ("private", "excluded_domain"),
        ("xn--mller-kva.example",),
    ),
    Cell(
        "public",
        "in",
        ("l@xn--mller-kva.example",),
        True,
        False,
        ("private", "excluded_domain"),
        ("müller.example",),
    ),
    Cell(
        "public",
        "in",
        ("l@sub.xn--mller-kva.example",),
        True,
        False,
        ("private", "excluded_domain"),
        ("müller.example",),
    ),
]
ROWS = PRIVATE_ROWS + CUSTOM_ROWS + PUBLIC_ROWS


def _cell_id(cell: Cell) -> str:
    link = "linked" if cell.linked else "unlinked"
    flag = "-flag" if cell.shared else ""
    excl = f"-excl[{','.join(cell.excluded)}]" if cell.excluded else ""
    return f"{cell.mode}-{cell.origin}-{link}{flag}-{'+'.join(cell.partners)}{excl}"


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


@pytest.mark.parametrize("cell", ROWS, ids=_cell_id)
def test_policy_table_cell(cell: Cell) -> None:
    ascii_partners = tuple(_domain(normalize(p) or "") for p in cell.partners)
    sent = cell.origin in ("out", "crm")
    facts = Facts(
        direction="out" if sent else "in",
        crm_sent=cell.origin == "crm",
        linked=cell.linked,
        owner_shared=cell.linked and cell.shared,
        sender_domain="own.example" if sent else ascii_partners[0],
        recipient_domains=ascii_partners if sent else ("own.example",),
    )
    excluded = tuple(normalize_domain(d) or d for d in cell.excluded)
    assert decide(Policy(cell.mode, excluded), facts) == cell.expected
    # The same through the account glue, with the domains as the config spells them.
    tagger = crm.account_policy(account(sharing=cell.mode, excluded=cell.excluded)).tagger
    assert tagger(facts) == cell.expected


@pytest.mark.parametrize("cell", ROWS, ids=_cell_id)
async def test_policy_table_cell_on_stored_mail(cell: Cell, store_at: StoreAt) -> None:
    acct = account(sharing=cell.mode, excluded=cell.excluded)
    if cell.origin == "in":
        raw = raw_message(1, cell.partners[0], [OWN], cell.partners[1:])
    else:
        raw = raw_message(1, f"Alice <{OWN}>", list(cell.partners))
    async with open_store(store_at) as store:
        await crm.sync_settings(store, config_of([acct], store_at.database))
        other = cell.partners[0] if cell.linked else "someone@else.example"
        await store.import_records([Record("L1", "lead", "Lead", (normalize(other) or "",))], {})
        await store.import_records([Record("C9", "contact", "Unrelated", ("z@z.example",))], {})
        if cell.shared:
            assert await store.set_share("alice", "L1" if cell.linked else "C9", True, {})
        origin = "crm" if cell.origin == "crm" else "pop3"
        mid = await store_one(store, acct, raw, 1, origin=origin)
        [own] = await store.messages("alice")
        assert (own.id, own.direction) == (mid, "in" if cell.origin == "in" else "out")
        assert (own.visibility, own.reason) == cell.expected
        assert own.records == (["L1"] if cell.linked else [])
        seen_by_bob = [m.id for m in await store.messages("bob")]
        assert seen_by_bob == ([mid] if cell.expected[0] == "shared" else [])
        # Unmatched mail is in no record's list, not even its owner's.
        assert [m.id for m in await store.messages("alice", record="L1")] == (
            [mid] if cell.linked else []
        )
        assert await store.messages("alice", record="C9") == []
        # The same tag again after a re-tag of the whole account (mode flip and back).
        flipped = account(sharing="private" if cell.mode != "private" else "custom")
        db = store_at.database
        await crm.sync_settings(store, config_of([flipped], db))
        await crm.sync_settings(store, config_of([acct], db))
        [again] = await store.messages("alice")
        assert (again.visibility, again.reason) == cell.expected


def test_every_reason_of_the_contract_is_reached_by_a_row() -> None:
    reached = {cell.expected[1] for cell in ROWS}
    assert reached == {
        "mode_private",
        "custom_shared",
        "custom_not_shared",
        "public",
        "excluded_domain",
        "crm_sent",
        "unmatched",
    }


@pytest.mark.parametrize(
    ("viewer", "owner", "visibility", "expected"),
    [
        ("alice", "alice", "private", True),
        ("alice", "alice", "shared", True),
        ("bob", "alice", "private", False),
        ("bob", "alice", "shared", True),
    ],
)
def test_owner_always_sees_own_others_only_shared(
    viewer: str, owner: str, visibility: str, expected: bool
) -> None:
    assert may_see(viewer, owner, visibility) is expected


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "lead@example.org",
        "LEAD@EXAMPLE.ORG",
        "Lead <lead@example.org>",
        '"Lead, Big (CEO)" <Lead@Example.Org>',
        "lead@example.org (work address)",
        "(comment) Lead@example.org.",
        "  <lead@EXAMPLE.org>  ",
        "=?utf-8?q?Gro=C3=9F?= <lead@example.org>",
    ],
)
def test_display_names_comments_and_case_are_removed(text: str) -> None:
    assert normalize(text) == "lead@example.org"


@pytest.mark.parametrize(
    "text",
    [
        "jürgen@müller.example",
        "JÜRGEN@MÜLLER.EXAMPLE",
        "Jürgen Müller <jürgen@xn--mller-kva.example>",
        "jürgen@XN--MLLER-KVA.example",
        "jürgen@mu\u0308ller.example",  # decomposed ü (NFD)
    ],
)
def test_unicode_and_idna_domains_compare_as_one(text: str) -> None:
    assert normalize(text) == "jürgen@xn--mller-kva.example"


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "not an address",
        "@x.example",
        "lead@",
        "lead@x.example@y.example",
        "<>",
        "le ad@x.example",
        "lead@x..example",
        'lead@"x"',
        '<"@',
        '":@-',
        "lead@[not a literal]",
        "Lead <>",
        "\x00\x01@\x02",
        "=?utf-8?b?!!!?=",
    ],
)
def test_unparseable_address_matches_nothing_and_never_raises(text: str | None) -> None:
    assert normalize(text) is None
    assert normalize_all([text] if text is not None else []) == ()
    assert link_addresses(Headers(from_addrs=(text or "",)), "in") == ()


@settings(max_examples=2000, deadline=None)
@given(st.text())
def test_normalize_of_any_text_is_none_or_a_canonical_fixpoint(text: str) -> None:
    norm = normalize(text)
    if norm is None:
        return
    local, at, domain = norm.rpartition("@")
    assert at and local and domain
    assert domain.isascii() and domain == domain.lower()
    assert local == local.casefold()
    assert normalize(norm) == norm


_SPECIALS = '"<>@,;:()\\[] .\t=?ü-'


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=_SPECIALS + "aBx", max_size=14))
def test_normalize_of_address_punctuation_is_none_or_a_canonical_fixpoint(text: str) -> None:
    norm = normalize(text)
    if norm is not None:
        assert normalize(norm) == norm
        assert norm.rpartition("@")[2].isascii()


_LOCAL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=12)
_IDN_LABEL = st.text(
    # Latin with diacritics, Cyrillic, Greek, CJK (escaped: they look like ASCII letters).
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789äöüéèñçøåæœþðłśž"
    "\u0430\u0431\u0432\u0433\u0434\u0436\u0437\u03ba\u03bb\u03bc\u03be\u4e2d\u6587\u65e5",
    min_size=1,
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(_LOCAL, _IDN_LABEL, st.sampled_from(["example", "example.org", "co.example"]))
def test_unicode_and_punycode_spellings_of_a_domain_normalise_alike(
    local: str, label: str, tail: str
) -> None:
    unicode_address = f"{local}@{label}.{tail}"
    norm = normalize(unicode_address)
    if norm is None:  # e.g. a local part such as "a..b" that parseaddr takes apart
        return
    ascii_domain = norm.rpartition("@")[2]
    # The domain back in Unicode (IDNA ToUnicode), and the ASCII form shouted: one address.
    back = ascii_domain.encode("ascii").decode("idna")
    assert normalize(f"{local}@{back}") == norm
    assert normalize(f"{local.upper()}@{ascii_domain.upper()}") == norm
    assert normalize(f"Someone <{local}@{label.upper()}.{tail}>") == norm


@settings(max_examples=300, deadline=None)
@given(_LOCAL, st.text(alphabet="abcdefghij ÄÖÜäöü'", max_size=20), st.booleans())
def test_display_name_and_comment_never_change_the_address(
    local: str, name: str, comment: bool
) -> None:
    address = f"{local}@sub.x.example"
    norm = normalize(address)
    if norm is None:
        return
    decorated = f'"{name}" <{address.upper()}>' if name.strip() else address.upper()
    if comment:
        decorated += " (a comment)"
    assert normalize(decorated) == norm


@pytest.mark.parametrize(
    ("domain", "excluded", "expected"),
    [
        ("x.example", ("x.example",), True),
        ("sub.x.example", ("x.example",), True),
        ("a.b.x.example", ("x.example",), True),
        ("notx.example", ("x.example",), False),
        ("x.example.com", ("x.example",), False),
        ("example", ("x.example",), False),
        ("x.example", ("sub.x.example",), False),
        ("y.example", ("x.example", "y.example"), True),
        ("y.example", (), False),
    ],
)
def test_excluded_domain_matches_itself_and_subdomains_only(
    domain: str, excluded: tuple[str, ...], expected: bool
) -> None:
    assert domain_matches(domain, excluded) is expected


def test_excluded_domains_in_unicode_are_compared_in_idna_form() -> None:
    assert normalize_domain("@Müller.Example") == "xn--mller-kva.example"
    facts = Facts("in", False, True, False, "sub.xn--mller-kva.example")
    tagger = crm.account_policy(account(sharing="public", excluded=["müller.example"])).tagger
    assert tagger(facts) == ("private", "excluded_domain")


@pytest.mark.parametrize(
    ("sender", "identity", "expected"),
    [
        ("Alice <ALICE@gmail.com>", "alice@gmail.com", "out"),
        ("alice@gmail.com", "recent:alice@gmail.com".removeprefix("recent:"), "out"),
        ("lead@example.org", "alice@gmail.com", "in"),
        ("alice@gmail.com.evil.example", "alice@gmail.com", "in"),
    ],
)
def test_direction_is_out_when_the_identity_sent_it(
    sender: str, identity: str, expected: str
) -> None:
    headers = parse_headers(f"From: {sender}\r\nTo: x@y.example\r\n".encode())
    assert direction_of(headers, (identity,)) == expected


def test_direction_without_from_is_in() -> None:
    assert direction_of(Headers(), ("alice@gmail.com",)) == "in"


def test_incoming_links_on_from_only_outgoing_on_to_and_cc() -> None:
    headers = Headers(
        from_addrs=("Lead <LEAD@x.example>",),
        to=("Alice <alice@own.example>", "t@y.example"),
        cc=("c@y.example", "T@Y.example", "garbage@@"),
    )
    assert link_addresses(headers, "in") == ("lead@x.example",)
    assert link_addresses(headers, "out") == ("alice@own.example", "t@y.example", "c@y.example")


# --------------------------------------------------------------------------------------------
# CSV rules (the CLI test covers exit 65 end to end)
# --------------------------------------------------------------------------------------------


def test_records_csv_reports_every_bad_line_and_returns_nothing() -> None:
    text = (
        "id,kind,email,name\n"
        "L1,lead,a@x.example,Good\n"
        "L2,customer,b@x.example,Unknown kind\n"
        ",contact,c@x.example,Empty id\n"
        "L4,lead,not an address,Bad address\n"
        'L5,lead,d@x.example;<"@,One bad of two\n'
        "L6,lead,,No address\n"
    )
    with pytest.raises(DataError) as caught:
        crm.parse_records_csv(text, "r.csv")
    message = str(caught.value)
    for line in (3, 4, 5, 6, 7):
        assert f"line {line}:" in message
    assert "line 2:" not in message
    assert "nothing imported" in message


def test_records_csv_normalises_several_addresses() -> None:
    text = "id,kind,email,name\nC1,Contact,Jürgen <JÜRGEN@Müller.example>; j@x.example ,J\n"
    [record] = crm.parse_records_csv(text, "r.csv")
    assert record == Record("C1", "contact", "J", ("jürgen@xn--mller-kva.example", "j@x.example"))


# --------------------------------------------------------------------------------------------
# Store behaviour the table depends on
# --------------------------------------------------------------------------------------------


async def test_multi_author_mail_keeps_its_tag_when_retagged(store_at: StoreAt) -> None:
    """The first From decides; a re-tag must not pick another author of the same message."""
    acct = account(sharing="public", excluded=["x.example"])
    raw = raw_message(1, "z@x.example, a@y.example", [OWN])
    async with open_store(store_at) as store:
        await store.import_records([Record("L1", "lead", "", ("a@y.example",))], {})
        await store.import_records([Record("L2", "lead", "", ("z@x.example",))], {})
        await store_one(store, acct, raw, 1)
        [before] = await store.messages("alice")
        assert (before.visibility, before.reason) == ("private", "excluded_domain")
        await store.set_share("alice", "L1", True, policies(acct))  # re-tags L1's mail
        [after] = await store.messages("alice")
        assert (after.visibility, after.reason) == ("private", "excluded_domain")


async def test_raw_utf8_sender_address_links_and_is_excluded(store_at: StoreAt) -> None:
    """Regression: compat32 turned raw UTF-8 header bytes into U+FFFD before matching."""
    acct = account(sharing="public", excluded=["xn--mller-kva.example"])
    raw = raw_message(1, "Jürgen <jürgen@müller.example>", [OWN])
    async with open_store(store_at) as store:
        await store.import_records(
            [Record("L1", "lead", "", ("jürgen@xn--mller-kva.example",))], {}
        )
        await store_one(store, acct, raw, 1)
        [mine] = await store.messages("alice")
        assert (mine.records, mine.reason) == (["L1"], "excluded_domain")


async def test_record_import_links_stored_mail_and_retags_it(store_at: StoreAt) -> None:
    acct = account(sharing="public", label="CRM")
    async with open_store(store_at) as store:
        await crm.sync_settings(store, config_of([acct], store_at.database))
        mid = await store_one(store, acct, raw_message(1, "ceo@corp.example", [OWN]), 1)
        [before] = await store.messages("alice")
        assert (before.reason, before.records, before.labels) == ("unmatched", [], [])
        csv_text = "id,kind,email,name\nC1,contact,CEO <CEO@Corp.Example>,The CEO\n"
        await store.import_records(crm.parse_records_csv(csv_text, "r.csv"), policies(acct))
        [after] = await store.messages("bob")
        assert (after.id, after.visibility, after.reason) == (mid, "shared", "public")
        assert (after.records, after.labels) == (["C1"], ["CRM"])


async def test_big_imports_and_mass_mail_link_across_sql_parameter_lists(store_at: StoreAt) -> None:
    """More records and recipients than one IN (...) list takes (the store splits them)."""
    many = 1200
    addresses = [f"r{i}@big.example" for i in range(many)]
    ids = [f"R{i:04d}" for i in range(many)]
    acct = account(sharing="custom")
    async with open_store(store_at) as store:
        await crm.sync_settings(store, config_of([acct], store_at.database))
        first = await store_one(store, acct, raw_message(1, addresses[-1], [OWN]), 1)
        await store_one(store, acct, raw_message(2, OWN, addresses), 2, origin="crm")
        records = [Record(i, "lead", "", (a,)) for i, a in zip(ids, addresses, strict=True)]
        assert await store.import_records(records, policies(acct)) == many
        await store.set_share("alice", ids[-1], True, policies(acct))
        # Stored after the import: linked at insert, the share flag found in the last part.
        await store_one(store, acct, raw_message(3, OWN, addresses[::-1]), 3)
        found = {m.id: m for m in await store.messages("bob")}
        assert set(found) == {first, first + 1, first + 2}
        assert (found[first].records, found[first].reason) == ([ids[-1]], "custom_shared")
        assert (found[first + 1].records, found[first + 1].reason) == (ids, "crm_sent")
        assert (found[first + 2].records, found[first + 2].reason) == (ids, "custom_shared")


async def test_ceo_contact_stays_private_under_the_default_mode(store_at: StoreAt) -> None:
    acct = account()  # sharing defaults to private
    async with open_store(store_at) as store:
        await crm.sync_settings(store, config_of([acct], store_at.database))
        await store.import_records([Record("C1", "contact", "CEO", ("ceo@own.example",))], {})
        await store.set_share("alice", "C1", True, policies(acct))
        await store_one(store, acct, raw_message(1, "CEO <ceo@own.example>", [OWN]), 1)
        [mine] = await store.messages("alice", record="C1")
        assert (mine.visibility, mine.reason) == ("private", "mode_private")
        assert await store.messages("bob") == []
        assert await store.messages("bob", record="C1") == []


# --------------------------------------------------------------------------------------------
# Property: random operation sequences against an independent model
# --------------------------------------------------------------------------------------------

#: Canonical domain -> ways mail and configs spell it.
DOMAINS: dict[str, tuple[str, ...]] = {
    "x.example": ("x.example", "X.Example"),
    "sub.x.example": ("sub.x.example", "SUB.x.EXAMPLE"),
    "notx.example": ("notx.example",),
    "y.example": ("y.example", "Y.EXAMPLE"),
    "xn--mller-kva.example": ("müller.example", "xn--mller-kva.example", "MÜLLER.example"),
}
#: A small pool, so that records, mail and excluded domains meet often.
KEYS = (*(f"a@{domain}" for domain in DOMAINS), "b@x.example")
#: Excludable domains as a config spells them -> canonical (IDNA) form.
EXCLUDABLE = {
    "x.example": "x.example",
    "sub.x.example": "sub.x.example",
    "y.example": "y.example",
    "müller.example": "xn--mller-kva.example",
    "xn--mller-kva.example": "xn--mller-kva.example",
}
#: (account name, owner, identity, how its own mail spells the identity)
ACCOUNTS = (
    ("alice-a", "alice", "alice@own.example", "Alice <ALICE@own.example>"),
    ("alice-b", "alice", "alice.b@own.example", "alice.b@OWN.example"),
    ("bob-a", "bob", "bob@own.example", "Bob <bob@own.example>"),
)
VIEWERS = ("alice", "bob", "carol")
RECORDS = ("R1", "R2", "R3")


def render(key: str, variant: int) -> str:
    """One way of writing an address: case, Unicode or IDNA domain, display name, comment.

    In mail a Unicode domain travels as raw UTF-8 in the header (RFC 6532).
    """
    local, _, domain = key.partition("@")
    spellings = DOMAINS[domain]
    text = f"{local}@{spellings[variant % len(spellings)]}"
    if variant & 1:
        text = text.upper()
    if variant & 2:
        text = f'"Person {local.upper()}, Ltd" <{text}>'
    if variant & 4:
        text += " (via web)"
    return text


def model_excluded(domain: str, excluded: frozenset[str]) -> bool:
    return any(domain == ex or domain.endswith("." + ex) for ex in excluded)


@dataclass
class ModelAccount:
    owner: str
    identity: str
    spelled: str
    sharing: str = "private"
    excluded: tuple[str, ...] = ()  # as the config spells them
    label: str | None = None


@dataclass
class ModelMessage:
    n: int
    id: int
    account: str
    owner: str
    origin: str  # in | out | crm
    sender: str  # canonical key (in) or the owner's identity
    recipients: tuple[str, ...]  # canonical keys on To and Cc, without the owner
    links_on: frozenset[str]
    records: set[str] = field(default_factory=set)


@dataclass
class Model:
    accounts: dict[str, ModelAccount]
    records: dict[str, frozenset[str]] = field(default_factory=dict)
    shares: set[tuple[str, str]] = field(default_factory=set)
    messages: list[ModelMessage] = field(default_factory=list)

    def tag(self, m: ModelMessage) -> tuple[str, str]:
        """ARCHITECTURE.md's table, read directly."""
        acct = self.accounts[m.account]
        if not m.records:
            return "private", "unmatched"
        if acct.sharing == "private":
            return "private", "mode_private"
        if acct.sharing == "custom":
            if m.origin == "crm":
                return "shared", "crm_sent"
            if any((m.owner, r) in self.shares for r in m.records):
                return "shared", "custom_shared"
            return "private", "custom_not_shared"
        excluded = frozenset(EXCLUDABLE[d] for d in acct.excluded)
        partners = [m.sender] if m.origin == "in" else list(m.recipients)
        if any(model_excluded(p.partition("@")[2], excluded) for p in partners):
            return "private", "excluded_domain"
        return "shared", "crm_sent" if m.origin == "crm" else "public"

    def labels(self, m: ModelMessage) -> list[str]:
        label = self.accounts[m.account].label
        # Email Magnet: incoming customer mail only.
        return [label] if label and m.records and m.origin == "in" else []

    def visible(self, viewer: str, record: str | None = None) -> list[ModelMessage]:
        return [
            m
            for m in sorted(self.messages, key=lambda m: -m.n)
            if (m.owner == viewer or self.tag(m)[0] == "shared")
            and (record is None or record in m.records)
        ]

    def set_addresses(self, record: str, keys: frozenset[str]) -> None:
        """Existing links stay; stored mail from the new addresses links now."""
        self.records[record] = keys
        for m in self.messages:
            if m.links_on & keys:
                m.records.add(record)

    def config(self, database: Path | str) -> Config:
        return config_of(
            [
                account(
                    name,
                    a.owner,
                    a.identity,
                    sharing=a.sharing,
                    excluded=a.excluded,
                    label=a.label,
                )
                for name, a in self.accounts.items()
            ],
            database,
        )


_ADDRESS = st.tuples(st.sampled_from(KEYS), st.integers(0, 7))
_ACCOUNT_NAMES = st.sampled_from([a[0] for a in ACCOUNTS])
_ADD = st.tuples(
    st.just("add"),
    _ACCOUNT_NAMES,
    st.sampled_from(["in", "out", "crm"]),
    _ADDRESS,
    st.lists(_ADDRESS, max_size=2),
    st.booleans(),  # extras on Cc (else on To)
)
_SETTINGS = (
    st.sampled_from(["private", "custom", "public"]),
    st.lists(st.sampled_from(sorted(EXCLUDABLE)), max_size=2, unique=True),
    st.sampled_from([None, "CRM", "Deals"]),
)
_MODE = st.tuples(st.just("mode"), _ACCOUNT_NAMES, *_SETTINGS)
_SHARE = st.tuples(
    st.just("share"), st.sampled_from(VIEWERS), st.sampled_from((*RECORDS, "R4")), st.booleans()
)
_EMAILS = st.tuples(
    st.just("emails"),
    st.sampled_from(RECORDS),
    st.lists(_ADDRESS, min_size=1, max_size=2),
    st.sampled_from(["set-email", "import"]),
)
_OPS = st.lists(st.one_of(_ADD, _ADD, _MODE, _SHARE, _EMAILS), min_size=1, max_size=12)
#: A start that is already interesting: each account in some mode, some records, some mail.
_START = st.tuples(
    *(st.tuples(st.just("mode"), st.just(name), *_SETTINGS) for name, *_ in ACCOUNTS),
    st.lists(_EMAILS, max_size=3),
    st.lists(_ADD, max_size=3),
)


async def _apply(store: Store, model: Model, db: Path | str, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "add":
        _, name, origin, (key, variant), extras, extras_on_cc = op
        acct = model.accounts[name]
        n = len(model.messages) + 1
        extra_text = [render(k, v) for k, v in extras]
        if origin == "in":
            raw = raw_message(n, render(key, variant), [acct.spelled], extra_text)
            sender, recipients, links_on = key, (), frozenset({key})
        else:
            to = [render(key, variant), *([] if extras_on_cc else extra_text)]
            raw = raw_message(n, acct.spelled, to, extra_text if extras_on_cc else [])
            recipients = (key, *(k for k, _ in extras))
            sender, links_on = acct.identity, frozenset(recipients)
        account = model.config(db).account(name)
        source = "crm" if origin == "crm" else "pop3"
        with new_message(raw, account, f"u{n}", origin=source) as item:
            [outcome] = await store.add_batch(name, acct.owner, [item], crm.account_policy(account))
        assert outcome.message is not None and not outcome.duplicate
        linked = {r for r, keys in model.records.items() if keys & links_on}
        model.messages.append(
            ModelMessage(
                n, outcome.message, name, acct.owner, origin, sender, recipients, links_on, linked
            )
        )
    elif kind == "mode":
        _, name, sharing, excluded, label = op
        acct = model.accounts[name]
        acct.sharing, acct.label = sharing, label
        acct.excluded = tuple(excluded) if sharing == "public" else ()
        await crm.sync_settings(store, model.config(db))
    elif kind == "share":
        _, owner, record, on = op
        done = await store.set_share(owner, record, on, crm.policies(model.config(db)))
        assert done == (record in model.records)
        if done:
            (model.shares.add if on else model.shares.discard)((owner, record))
    else:
        _, record, addresses, how = op
        text = "; ".join(render(k, v) for k, v in addresses)
        parsed, bad = crm.parse_emails(text)
        keys = frozenset(k for k, _ in addresses)
        assert not bad and set(parsed) == keys, text
        pols = crm.policies(model.config(db))
        if how == "import":
            await store.import_records([Record(record, "lead", record, parsed)], pols)
        elif not await store.set_record_emails(record, parsed, pols):
            assert record not in model.records
            return
        model.set_addresses(record, keys)


async def _check(store: Store, model: Model, *, records_too: bool) -> None:
    for viewer in VIEWERS:
        seen = await store.messages(viewer)
        expected = model.visible(viewer)
        assert [m.id for m in seen] == [m.id for m in expected], viewer
        for got, want in zip(seen, expected, strict=True):
            # A private message is never visible to anyone but its owner.
            assert got.owner == viewer or got.visibility == "shared"
            assert (got.visibility, got.reason) == model.tag(want), (viewer, want)
            assert got.records == sorted(want.records)
            assert got.labels == model.labels(want)
            assert got.direction == ("in" if want.origin == "in" else "out")
        if records_too:
            for record in (*RECORDS, "R4"):
                listed = [m.id for m in await store.messages(viewer, record=record)]
                assert listed == [m.id for m in model.visible(viewer, record)], (viewer, record)
            for label in ("CRM", "Deals"):
                listed = [m.id for m in await store.messages(viewer, label=label)]
                assert listed == [
                    m.id for m in model.visible(viewer) if label in model.labels(m)
                ], (viewer, label)


async def _run_sequence(at: StoreAt, ops: list[tuple[Any, ...]]) -> None:
    db = at.database
    model = Model(
        {name: ModelAccount(owner, ident, spelled) for name, owner, ident, spelled in ACCOUNTS}
    )
    async with open_store(at) as store:
        await crm.sync_settings(store, model.config(db))
        for op in ops:
            await _apply(store, model, db, op)
            await _check(store, model, records_too=False)
        await _check(store, model, records_too=True)


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_START, _OPS)
def test_what_each_viewer_sees_matches_the_model(
    start: tuple[Any, ...], ops: list[tuple[Any, ...]]
) -> None:
    *modes, records, mail = start
    with tempfile.TemporaryDirectory(prefix="mailingest-prop-") as tmp:
        at = StoreAt(Path(tmp) / "mail.db")
        asyncio.run(_run_sequence(at, [*modes, *records, *mail, *ops]))


@settings(
    max_examples=120,  # a new database each: fewer examples, the same model
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(_START, _OPS)
def test_what_each_viewer_sees_matches_the_model_on_postgresql(
    postgres: Postgres, tmp_path: Path, start: tuple[Any, ...], ops: list[tuple[Any, ...]]
) -> None:
    *modes, records, mail = start
    secret = tmp_path / "db-password"
    secret.write_text(postgres.password)
    at = StoreAt(postgres.new_database(), secret)
    asyncio.run(_run_sequence(at, [*modes, *records, *mail, *ops]))


async def test_a_reader_sees_a_settings_change_whole_or_not_at_all(store_at: StoreAt) -> None:
    """A viewer query on another connection, while re-tags commit: each message's tag, links
    and labels come from one state (private, unlabelled / public, labelled CRM)."""
    private, public = account(), account(sharing="public", label="CRM")
    async with open_store(store_at) as writer, open_store(store_at) as reader:
        await writer.import_records([Record("L1", "lead", "", ("lead@customer.example",))], {})
        await crm.sync_settings(writer, config_of([private], store_at.database))
        for n in range(40):
            await store_one(writer, private, raw_message(n, "lead@customer.example", [OWN]), n)

        async def toggle() -> None:
            for flip in range(12):  # bounded: the reader stops when this is done
                chosen = public if flip % 2 == 0 else private
                await crm.sync_settings(writer, config_of([chosen], store_at.database))

        async def read() -> set[tuple[str, ...]]:
            seen: set[tuple[str, ...]] = set()
            while not toggling.done():
                for m in await reader.messages("alice"):
                    seen.add((m.visibility, m.reason, *m.labels))
                    assert m.records == ["L1"]
                states = {(m.visibility, tuple(m.labels)) for m in await reader.messages("alice")}
                assert len(states) == 1, states  # never half re-tagged
            return seen

        toggling = asyncio.ensure_future(toggle())
        try:
            seen = await read()
        finally:
            toggling.cancel()
            await asyncio.wait({toggling})
        toggling.result()  # the re-tags themselves succeeded
    assert seen <= {("private", "mode_private"), ("shared", "public", "CRM")}

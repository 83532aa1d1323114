"""The malformed-mail corpus (tests/corpus/*.eml) through a real Dovecot: stored byte-exact,
parsed without raising, listed with sane fields, linked where an address is readable."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from builders import dovecot_account, served, sha
from dovecot import Dovecot
from mailingest.matching import direction_of, link_addresses, normalize, normalize_all
from mailingest.model import Headers
from mailingest.parse import parse_headers, read_head
from support import TESTS, fetch_json, poplib_digests, run_cli, run_sql, write_config

CORPUS_DIR = TESTS / "corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.eml"))
OWNER = "alice"
IDENTITY = "owner@example.com"

# Records whose addresses corpus messages carry in odd spellings (see make_corpus.py).
RECORDS_CSV = """id,kind,email,name
R-IDNA,lead,jurgen@m\u00fcller.example,J\u00fcrgen (IDNA and Unicode spellings)
R-LEAD,contact,lead@example.org,Lead (comments and a trailing dot)
R-KOI8,lead,ivan@example.ru;nobody@example.invalid,Ivan (RFC 2047 name in koi8-r)
R-BULK,contact,r9999@example.net,Last of 10000 recipients
"""
# Which corpus files each record must link (incoming mail links on From).
EXPECTED_LINKS = {
    "R-IDNA": {"38-from-idna-ascii.eml", "39-from-idna-unicode.eml", "85-utf8-headers-rfc6532.eml"},
    "R-LEAD": {"34-from-comments.eml", "42-from-trailing-dot.eml"},
    "R-KOI8": {"18-rfc2047-display-name.eml"},
    "R-BULK": set(),  # a recipient of incoming mail links nothing
}
VISIBILITY = {"private", "shared"}
REASONS = {
    "mode_private",
    "custom_shared",
    "custom_not_shared",
    "public",
    "excluded_domain",
    "crm_sent",
    "unmatched",
}


def test_committed_corpus_matches_its_generator() -> None:
    proc = subprocess.run(
        [sys.executable, str(CORPUS_DIR / "make_corpus.py"), "--check"],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(CORPUS) >= 50


# -- in process: parsing and matching never raise ------------------------------------------


def _check_headers(headers: Headers) -> None:
    for field in (headers.from_addrs, headers.to, headers.cc, headers.reply_to):
        assert isinstance(field, tuple) and all(isinstance(a, str) and a for a in field)
    for text in (headers.subject, headers.message_id, headers.references):
        assert text is None or isinstance(text, str)
    if headers.date is not None:
        assert datetime.fromisoformat(headers.date).utcoffset() is not None
    for address in normalize_all((*headers.from_addrs, *headers.to, *headers.cc)):
        assert normalize(address) == address  # a fixpoint: records compare equal to it
    for direction in ("in", "out"):
        assert set(link_addresses(headers, direction)) <= set(
            normalize_all((*headers.from_addrs, *headers.to, *headers.cc))
        )
    assert direction_of(headers, (IDENTITY,)) in ("in", "out")


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_parse_and_matching_never_raise(path: Path) -> None:
    raw = path.read_bytes()
    for data in (raw, served(raw)):
        _check_headers(parse_headers(data))
        _check_headers(parse_headers(read_head(io.BytesIO(data))))


# -- through Dovecot ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ingested:
    config: Path
    reference: dict[str, str]  # file name -> sha256 of what poplib RETR returned
    fetch: dict[str, Any]
    listing: list[dict[str, Any]]
    stored: dict[str, bytes]  # sha256 column -> the bytes read back from the store


def _read_back(database: Path) -> dict[str, bytes]:
    """The stored bytes of each message, by its recorded sha256."""
    out: dict[str, bytes] = {}
    for message_id, digest in run_sql(database, "SELECT id, sha256 FROM messages"):
        assert digest not in out, f"stored twice: {digest}"
        chunks = run_sql(
            database, "SELECT data FROM message_chunks WHERE message = ? ORDER BY seq", message_id
        )
        out[digest] = b"".join(chunk for (chunk,) in chunks)
    return out


@pytest.fixture(scope="module")
def ingested(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingested]:
    """Every corpus file delivered to one mailbox, then one `mailingest fetch`."""
    box = dovecot.new_mailbox()
    directory = tmp_path_factory.mktemp("corpus")
    for path in CORPUS:  # one at a time: each delivery gets the next UID, in file order
        box.deliver(path.read_bytes())
    digests = poplib_digests(dovecot.host, dovecot.port, box.user, box.password)
    assert len(digests) == len(CORPUS)
    reference = {p.name: d for p, d in zip(CORPUS, digests, strict=True)}
    config = write_config(directory, [dovecot_account(box, owner=OWNER, timeout="60s")])
    (directory / "records.csv").write_text(RECORDS_CSV, encoding="utf-8")
    imported = run_cli(config, "records", "import", str(directory / "records.csv"))
    assert imported.returncode == 0, imported.stderr.decode()

    code, out = fetch_json(config)

    assert code == 0, out
    listing = run_cli(config, "messages", "--viewer", OWNER, "--json")
    assert listing.returncode == 0, listing.stderr.decode()
    yield Ingested(
        config, reference, out, json.loads(listing.stdout), _read_back(directory / "mail.db")
    )


def test_every_corpus_message_is_stored_byte_exact_once(ingested: Ingested) -> None:
    [result] = ingested.fetch["accounts"]
    assert result["status"] == "ok" and result["error"] is None, result
    assert result["new"] == len(CORPUS)
    assert len(set(ingested.reference.values())) == len(CORPUS)  # distinct as served
    assert sorted(ingested.stored) == sorted(ingested.reference.values())
    for digest, raw in ingested.stored.items():
        assert sha(raw) == digest  # the bytes read back, not only the recorded hash


def test_a_second_fetch_stores_nothing_more(ingested: Ingested) -> None:
    code, out = fetch_json(ingested.config)
    assert code == 0 and out["accounts"][0]["new"] == 0, out
    assert len(_read_back(ingested.config.parent / "mail.db")) == len(CORPUS)


def test_stored_corpus_parses_and_lists_with_sane_fields(ingested: Ingested) -> None:
    for raw in ingested.stored.values():
        _check_headers(parse_headers(read_head(io.BytesIO(raw))))
    listing = ingested.listing
    assert sorted(m["sha256"] for m in listing) == sorted(ingested.reference.values())
    ids = [m["id"] for m in listing]
    assert len(set(ids)) == len(ids)
    for m in listing:
        assert isinstance(m["id"], int)
        assert m["account"] == "acct" and m["owner"] == OWNER
        assert m["direction"] in ("in", "out")
        assert m["from"] is None or isinstance(m["from"], str)
        for key in ("to", "cc", "records", "labels"):
            assert isinstance(m[key], list) and all(isinstance(v, str) for v in m[key])
        for key in ("subject", "message_id"):
            assert m[key] is None or isinstance(m[key], str)
        if m["date"] is not None:
            assert datetime.fromisoformat(str(m["date"])).utcoffset() is not None
        assert m["visibility"] in VISIBILITY and m["reason"] in REASONS
        assert re.fullmatch(r"[0-9a-f]{64}", str(m["sha256"]))
        assert m["size"] == len(ingested.stored[str(m["sha256"])])
    bulk = next(m for m in listing if len(m["to"]) >= 10_000)
    assert len(bulk["to"]) == 10_000


def test_matching_links_odd_spellings_and_ignores_garbage(ingested: Ingested) -> None:
    name_of = {digest: name for name, digest in ingested.reference.items()}
    for record, files in EXPECTED_LINKS.items():
        proc = run_cli(ingested.config, "messages", "--viewer", OWNER, "--record", record, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        linked = {name_of[m["sha256"]] for m in json.loads(proc.stdout)}
        assert linked == files, record
    linked_any = {name_of[str(m["sha256"])] for m in ingested.listing if m["records"]}
    assert linked_any == set().union(*EXPECTED_LINKS.values())
    for m in ingested.listing:
        expected_reason = "mode_private" if m["records"] else "unmatched"
        assert (m["visibility"], m["reason"]) == ("private", expected_reason), m


def test_show_prints_the_oddest_messages(ingested: Ingested) -> None:
    """The human view of messages with control characters, NULs and huge headers."""
    by_name = {
        name: next(m for m in ingested.listing if m["sha256"] == digest)
        for name, digest in ingested.reference.items()
    }
    for name in ("22-rfc2047-control-chars.eml", "51-nul-in-headers.eml", "47-zero-length.eml"):
        message_id = str(by_name[name]["id"])
        shown = run_cli(ingested.config, "show", message_id, "--viewer", OWNER)
        assert shown.returncode == 0, (name, shown.stderr.decode())
        raw = run_cli(ingested.config, "show", message_id, "--viewer", OWNER, "--raw")
        assert raw.returncode == 0 and sha(raw.stdout) == ingested.reference[name]

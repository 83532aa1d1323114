"""The log catalog agrees with the code and docs/logging.md; lines are JSON, never secrets."""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailingest import logs, masking
from support import ROOT

PACKAGE = ROOT / "daemon" / "mailingest"
DOC = ROOT / "docs" / "logging.md"
LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error"}
LEVELS["exception"] = "error"
SECRET = 'Pa"ss\\wörd-Zebra-42'


def _is_logger(node: ast.expr) -> bool:
    """`log.<level>(...)` or `structlog.get_logger(...).<level>(...)`."""
    if isinstance(node, ast.Name):
        return node.id == "log"
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name == "get_logger"
    return False


def logged() -> dict[str, tuple[set[str], set[str]]]:
    """Every event the package logs: the keys and levels over all its call sites."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and _is_logger(node.func.value)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                continue
            keys, levels = found.setdefault(node.args[0].value, (set(), set()))
            keys.update(k.arg for k in node.keywords if k.arg and k.arg != "exc_info")
            levels.add(LEVELS[node.func.attr])
    return found


def documented() -> dict[str, tuple[set[str], set[str]]]:
    """docs/logging.md's event table: name -> (keys, levels)."""
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`\w+`", cells[0]):
            levels = {level.strip() for level in cells[1].split(",")}
            rows[cells[0].strip("`")] = (set(re.findall(r"`(\w+)`", cells[2])), levels)
    return rows


def test_every_event_the_code_logs_is_catalogued_with_its_exact_keys() -> None:
    code = logged()
    assert code, "no logger calls found"
    assert set(code) == set(logs.EVENTS), set(code) ^ set(logs.EVENTS)
    for event, (keys, _) in code.items():
        assert keys == set(logs.event_keys(event)), (event, keys, logs.event_keys(event))


def test_only_logs_py_uses_structlog() -> None:
    """Loggers come from logs.get_logger: a structlog logger would miss the configured JSON
    lines (logs.py writes them) and bring structlog's import back to every start."""
    users = [
        path.relative_to(PACKAGE).as_posix()
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "logs.py" and "structlog" in path.read_text(encoding="utf-8")
    ]
    assert users == []


def test_docs_logging_md_documents_the_catalog_keys_and_levels() -> None:
    doc = documented()
    assert set(doc) == set(logs.EVENTS), set(doc) ^ set(logs.EVENTS)
    code = logged()
    for event, (keys, levels) in doc.items():
        assert keys == set(logs.event_keys(event)), event
        assert levels == code[event][1], (event, levels, code[event][1])


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.register_secrets([SECRET])
    logs.configure("json", level=10, stream=stream)
    yield stream
    logs.reset()


def test_json_lines_carry_timestamp_level_event_and_mask_every_secret(
    captured: io.StringIO,
) -> None:
    log = logs.get_logger("test")
    log.info("poll_failed", account="a", error_kind="auth_failed", error=f"said {SECRET}")
    log.warning("config_rejected", error={"nested": [SECRET, {"password": "x"}]})
    log.debug("poll_started", account="a", line=f"PASS {SECRET}", auth="AUTH PLAIN AGFAYg==")
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        log.exception("poll_crashed", account="a")
    log.info(
        "demo_server_started",
        port=1,
        obj=object.__new__(type("X", (), {"__repr__": lambda _: SECRET})),
    )
    text = captured.getvalue()
    for form in (SECRET, json.dumps(SECRET)[1:-1], repr(SECRET)[1:-1], "AGFAYg=="):
        assert form not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 5
    for line in lines:
        assert {"timestamp", "level", "event"} <= set(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", line["timestamp"])
    assert [line["level"] for line in lines] == ["info", "warning", "debug", "error", "info"]
    assert lines[2]["line"] == "PASS ***" and lines[2]["auth"] == "***"
    assert "boom ***" in lines[3]["exception"]


def test_console_output_masks_secrets_too() -> None:
    stream = io.StringIO()
    logs.register_secrets([SECRET])
    logs.configure("console", stream=stream)
    try:
        logs.get_logger("test").warning("account_paused", account="a", reason=SECRET)
    finally:
        logs.reset()
    assert "account_paused" in stream.getvalue()
    assert SECRET not in stream.getvalue() and "***" in stream.getvalue()


def test_mask_text_keeps_prose_readable() -> None:
    assert logs.mask_text("please pass the salt") == "please pass the salt"
    assert logs.mask_text("-ERR [AUTH] rejected") == "-ERR [AUTH] rejected"
    assert logs.mask_text("sent PASS hunter2 then") == "sent PASS *** then"


@pytest.mark.parametrize(
    "secret", [SECRET, "it's-Zebra-42", "plain-Zebra-42", "both'\"-Zebra"], ids=repr
)
def test_a_secret_quoted_as_bytes_or_in_either_quote_style_is_masked(secret: str) -> None:
    """Errors quote server lines as bytes (`line[:80]!r`), tracebacks show poplib's bytes
    replies, and a repr picks its quotes by the text around the secret (a ' in it is
    escaped or not): every one of these is a form of the secret."""
    masker = masking.Secrets()
    masker.add([secret])
    data = secret.encode()
    for around in ("x", "x'", 'x"', "x'\""):
        for quoted in (repr(around.encode() + data + b"y"), repr(around + secret + "y")):
            masked = masker.mask(quoted)
            assert "Zebra" not in masked and "***" in masked, (quoted, masked)


def test_a_traceback_quoting_a_bytes_reply_is_masked(captured: io.StringIO) -> None:
    import poplib

    try:
        raise poplib.error_proto(b"-ERR no such mailbox " + SECRET.encode())
    except poplib.error_proto:
        logs.get_logger("test").exception("poll_crashed", account="a")
    [line] = captured.getvalue().splitlines()
    assert "Zebra" not in line and "-ERR no such mailbox ***" in json.loads(line)["exception"]


_SECRET_TEXT = st.text(st.characters(blacklist_characters="*"), min_size=3, max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(_SECRET_TEXT, min_size=1, max_size=6),
    pieces=st.lists(st.one_of(st.text(max_size=8), st.integers(0, 5)), max_size=12),
)
def test_no_form_of_any_secret_survives_the_mask(secrets: list[str], pieces: list[object]) -> None:
    """Secrets that overlap or contain one another, in any of the forms a renderer writes
    (as is, JSON- or repr-escaped), are masked whole wherever they appear."""
    masker = masking.Secrets()
    masker.add(secrets)
    forms = {f for s in secrets for f in masking.rendered_forms(s)}
    ordered = sorted(forms)
    text = "".join(p if isinstance(p, str) else ordered[p % len(ordered)] for p in pieces)
    masked = masker.mask(text)
    assert not [f for f in forms if f in masked], (text, masked)
    if not any(f in text for f in forms):
        assert masked == text


_DIGITS = "0123456789"
#: Nested keys of one or two letters: no secret (3 characters or more) fits in one.
_KEYS = st.text("abcdefgh", min_size=1, max_size=2)


@st.composite
def _event_values(draw: st.DrawFn, secrets: list[str]) -> dict[str, object]:
    """Keys and values of one event: text holding any form of the secrets, numbers holding
    the digits of the numeric ones, and lists and objects of those."""
    forms = sorted({f for s in secrets for f in masking.rendered_forms(s)})
    numeric = [s for s in secrets if s.isdigit()] or ["42"]
    text = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(forms)), max_size=5).map("".join)
    around = st.text(_DIGITS, max_size=3)
    digits = st.tuples(around, st.sampled_from(numeric), around).map("".join)
    number = st.one_of(
        st.integers(),
        digits.map(lambda d: int("1" + d)),
        digits.map(lambda d: float("1" + d + ".5")),
        st.floats(allow_nan=False, allow_infinity=False),
    )
    leaf = st.one_of(st.none(), st.booleans(), number, text)
    value = st.recursive(
        leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3)
    )
    return draw(st.dictionaries(_KEYS, value, min_size=1, max_size=5))


def _same_but_masked_text(logged: object, written: object, forms: set[str]) -> None:
    """``written`` (parsed back) is ``logged`` with no form of a secret in any text, and
    everything that is not text unchanged."""
    if isinstance(logged, str):
        assert isinstance(written, str) and not [f for f in forms if f in written], written
    elif isinstance(logged, dict):
        assert isinstance(written, dict) and list(written) == list(logged), written
        for key, inner in logged.items():
            _same_but_masked_text(inner, written[key], forms)
    elif isinstance(logged, list):
        assert isinstance(written, list) and len(written) == len(logged), written
        for one, other in zip(logged, written, strict=True):
            _same_but_masked_text(one, other, forms)
    else:
        assert type(written) is type(logged) and written == logged, (logged, written)


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(
        _SECRET_TEXT | st.text(_DIGITS, min_size=3, max_size=6), min_size=1, max_size=4
    ),
    data=st.data(),
)
def test_json_lines_stay_json_with_numbers_unchanged_and_no_secret_in_any_text(
    secrets: list[str], data: st.DataObject
) -> None:
    """A numeric secret (a PIN-like password) must not cut into a number (`"bytes": 12345`
    with a secret 234), nor a secret with quotes or commas into the line's JSON: text is
    masked before the line is written, numbers are not. `timestamp`, `level` and `event`
    are the line's own and never masked."""
    kw = data.draw(_event_values(secrets))
    masker = masking.Secrets()
    masker.add(secrets)
    forms = {f for s in secrets for f in masking.rendered_forms(s)}
    stream = io.StringIO()
    saved, masking.registered = masking.registered, masker
    logs.configure("json", level=10, stream=stream)
    try:
        logs.get_logger("test").info("poll_completed", **kw)
    finally:
        logs.reset()
        masking.registered = saved
    written = json.loads(stream.getvalue())
    assert (written.pop("event"), written.pop("level")) == ("poll_completed", "info")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", written.pop("timestamp"))
    _same_but_masked_text(kw, written, forms)


def test_thousands_of_secrets_are_masked_one_by_one() -> None:
    """A daemon with a password per account: each is masked, others' lines are untouched."""
    masker = masking.Secrets()
    passwords = [f"pw-{n:05d}-{n * 7919 % 10007:05d}" for n in range(5000)]
    masker.add(passwords)
    masker.add(passwords[:10])  # registered again on a reload: nothing changes
    for pw in passwords[::499]:
        line = json.dumps({"event": "poll_failed", "error": f"-ERR bad {pw} for x"})
        assert pw not in masker.mask(line) and "***" in masker.mask(line)
    assert masker.mask('{"event": "poll_completed", "new": 0}') == (
        '{"event": "poll_completed", "new": 0}'
    )


def test_a_secret_inside_an_object_is_masked_before_json_escapes_its_repr() -> None:
    """A value JSON cannot carry is written as its repr: a secret with a backslash or both
    quotes in it is escaped twice on the way, and must be masked before that."""

    class Holder:
        def __repr__(self) -> str:
            return f"Holder(password={SECRET!r})"

    logs.register_secrets([SECRET])
    stream = io.StringIO()
    logs.configure("json", level=10, stream=stream)
    try:
        logs.get_logger("test").info("poll_failed", account="a", error=Holder())
    finally:
        logs.reset()
    line = stream.getvalue()
    assert "***" in line and "ss\\" not in line and "Zebra" not in line, line


_OPS = st.lists(
    st.tuples(
        st.sampled_from([None, "a pop3", "a smtp", "b pop3"]),
        st.lists(_SECRET_TEXT | st.text("ab'\"", min_size=3, max_size=5), max_size=4),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS, pieces=st.lists(st.one_of(st.text(max_size=8), st.integers(0, 40)), max_size=12))
def test_slots_mask_what_they_hold_now_as_if_registered_afresh(
    ops: list[tuple[str | None, list[str]]], pieces: list[object]
) -> None:
    """Secrets kept for good (slot None: the config's) and slots whose values replace each
    other (an account's OAuth2 tokens) in any order, sharing values or not: the mask is the
    one a new registry of what is held now would apply, so a replaced token is no longer
    looked for and a value still held elsewhere stays masked."""
    masker = masking.Secrets()
    kept: set[str] = set()
    slots: dict[str, list[str]] = {}
    for slot, values in ops:
        if slot is None:
            masker.add(values)
            kept |= set(values)
        else:
            masker.hold(slot, values)
            slots[slot] = values
    held = kept.union(*slots.values())
    afresh = masking.Secrets()
    afresh.add(held)
    seen = sorted({f for _, values in ops for s in values for f in masking.rendered_forms(s)})
    seen = seen or ["x"]
    text = "".join(p if isinstance(p, str) else seen[p % len(seen)] for p in pieces)
    assert masker.mask(text) == afresh.mask(text)
    assert masker._index == afresh._index  # nothing of a replaced token is left behind


def test_an_hourly_token_replaces_the_last_one_in_the_mask() -> None:
    """A day of tokens of 500 accounts leaves the mask holding one token each."""
    masker = masking.Secrets()
    masker.add(["config-password-1"])
    for hour in range(24):
        for n in range(500):
            masker.hold(f"acct{n} pop3", [f"ya29.token-{n}-{hour}", f"refresh-{n}"])
    assert masker.mask("ya29.token-7-23 refresh-7 ya29.token-7-22") == "*** *** ya29.token-7-22"
    assert masker.mask("config-password-1") == "***"
    latest = [f"ya29.token-{n}-23" for n in range(500)] + [f"refresh-{n}" for n in range(500)]
    forms = {f for s in [*latest, "config-password-1"] for f in masking.rendered_forms(s)}
    assert sum(len(held) for _, held in masker._index.values()) == len(forms)
    masker.hold("acct7 pop3", [])
    assert masker.mask("ya29.token-7-23 refresh-7") == "ya29.token-7-23 refresh-7"

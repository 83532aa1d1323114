"""The header parse's shortcut for plain addresses agrees with the email package."""

from __future__ import annotations

from email.utils import getaddresses

from hypothesis import given, settings
from hypothesis import strategies as st

from mailingest import parse


def _by_the_email_package(values: list[str]) -> tuple[str, ...]:
    return tuple(addr.strip() for _, addr in getaddresses(values) if addr and addr.strip())


_SIMPLE_VALUES = st.from_regex(parse._SIMPLE, fullmatch=True)
_ANY_VALUES = st.text(st.sampled_from("ab.Z09_'-+% <>@,\"()\t:;[]\\"), max_size=40)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(_SIMPLE_VALUES, _ANY_VALUES), max_size=3))
def test_addresses_agree_with_the_email_package(values: list[str]) -> None:
    assert parse._addresses(values) == _by_the_email_package(values)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_SIMPLE_VALUES, min_size=1, max_size=3))
def test_the_shortcut_takes_plain_addresses(values: list[str]) -> None:
    """Every value the shortcut matches (the regex itself generates them) reads as the
    email package reads it."""
    assert all(parse._SIMPLE.fullmatch(v) for v in values)
    assert parse._addresses(values) == _by_the_email_package(values)


def test_common_forms() -> None:
    assert parse._addresses(["Person 0 <lead0@customer0.example>"]) == ("lead0@customer0.example",)
    assert parse._addresses(["J. Smith <j.smith@x.example>", "a+b@y.example"]) == (
        "j.smith@x.example",
        "a+b@y.example",
    )
    # Not for the shortcut: quoted names, several addresses in one value, folded lines.
    assert parse._addresses(['"Smith, J" <j@x.example>, k@y.example']) == (
        "j@x.example",
        "k@y.example",
    )
    assert parse._addresses(["Person\r\n <p@x.example>"]) == ("p@x.example",)

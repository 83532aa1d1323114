"""Property: whatever the sharing changes made through the API (share flags and sharing
modes, by the owner, an admin or the CRM acting for the owner), no response ever holds a
message its viewer may not see, and each viewer's listing is exactly what the sharing rules
(and `mailingest messages --viewer`) give. `mailingest run` and a real Dovecot; the two
owners' accounts are added through the API (kept in the database), so modes can change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api_support import RECORDS, SENDERS, ApiWorld, mail
from dovecot import Dovecot

OWNERS = ("alice", "bob")
VIEWERS = ("alice", "bob", "carol")
MODES = ("private", "custom", "public")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> Iterator[ApiWorld]:
    storage = {"database": "mail.db", "secret_key": "a-test-key-of-32-characters-long"}
    directory = tmp_path_factory.mktemp("api-property")
    world = ApiWorld(directory, dovecot, storage=storage, file_accounts=False)
    world.import_records()
    world.make_tokens()
    world.alice.deliver_many([mail(n, s) for n, s in enumerate(SENDERS)])
    world.bob.deliver_many([mail(10 + n, s) for n, s in enumerate(SENDERS)])
    with world.running() as daemon:
        for owner, table in zip(OWNERS, world.accounts, strict=True):
            added = world.send("POST", owner, "/accounts", json=table)
            assert added.status_code == 200, added.text
        world.wait_stored(2 * len(SENDERS))
        yield world
        assert daemon.events("api_request_failed") == []


def _truth(world: ApiWorld) -> dict[int, tuple[str, tuple[str, ...]]]:
    """id -> (owner, linked records) of every stored message (links do not change here)."""
    return {
        m["id"]: (m["owner"], tuple(m["records"]))
        for who in OWNERS
        for m in world.all_messages(who)
        if m["owner"] == who
    }


def _may_see(
    viewer: str,
    owner: str,
    records: tuple[str, ...],
    modes: dict[str, str],
    flags: set[tuple[str, str]],
) -> bool:
    """README's table: the owner sees their own; others linked mail that is public, or in
    custom mode linked to a record the owner shared; unmatched mail stays private."""
    if viewer == owner:
        return True
    if not records or modes[owner] == "private":
        return False
    return modes[owner] == "public" or any((owner, r) in flags for r in records)


ASKERS = st.sampled_from(("owner", "admin", "crm"))
#: One change: a share flag (owner, record, on) or a mode (owner, mode), and who asks.
CHANGES = st.lists(
    st.one_of(
        st.tuples(
            st.just("flag"),
            st.sampled_from(OWNERS),
            st.sampled_from(RECORDS),
            st.booleans(),
            ASKERS,
        ),
        st.tuples(
            st.just("mode"), st.sampled_from(OWNERS), st.sampled_from(MODES), st.none(), ASKERS
        ),
    ),
    min_size=1,
    max_size=6,
)


def _as(asker: str, owner: str) -> tuple[str, dict[str, str]]:
    return {
        "owner": (owner, {}),
        "admin": ("admin", {}),
        "crm": ("crm", {"X-Act-As": owner}),
    }[asker]


@settings(max_examples=20, deadline=None)
@given(changes=CHANGES, checked=st.sampled_from(VIEWERS))
def test_no_response_holds_mail_the_viewer_may_not_see(
    world: ApiWorld, changes: list[tuple[str, str, str, bool | None, str]], checked: str
) -> None:
    truth = _truth(world)
    assert len(truth) == 2 * len(SENDERS)
    for owner in OWNERS:  # every example starts in custom mode with no flag set
        custom = {"sharing": "custom"}
        world.send("PATCH", owner, f"/accounts/{owner}-mail", json=custom).raise_for_status()
        for record in RECORDS:
            world.send("DELETE", owner, f"/records/{record}/shares/{owner}").raise_for_status()
    modes = dict.fromkeys(OWNERS, "custom")
    flags: set[tuple[str, str]] = set()
    for kind, owner, value, on, asker in changes:
        who, headers = _as(asker, owner)
        if kind == "mode":
            path, body = f"/accounts/{owner}-mail", {"sharing": value}
            response = world.send("PATCH", who, path, json=body, headers=headers)
            assert response.status_code == 200, response.text
            modes[owner] = value
        else:
            method = "PUT" if on else "DELETE"
            path = f"/records/{value}/shares/{owner}"
            response = world.send(method, who, path, headers=headers)
            if on and modes[owner] == "public":  # no share checkbox in public mode
                assert (response.status_code, response.json()["field"]) == (422, "owner")
            else:
                assert response.status_code == 200, response.text
                (flags.add if on else flags.discard)((owner, value))
        for viewer in VIEWERS:
            listed = world.all_messages(viewer)
            allowed = {i for i, (o, r) in truth.items() if _may_see(viewer, o, r, modes, flags)}
            assert {m["id"] for m in listed} == allowed, (viewer, modes, flags)
            for message_id, (message_owner, records) in truth.items():
                visible = _may_see(viewer, message_owner, records, modes, flags)
                one = world.get(viewer, f"/messages/{message_id}")
                assert one.status_code == (200 if visible else 404), (viewer, message_id)
                raw = world.get(viewer, f"/messages/{message_id}/raw")
                assert raw.status_code == (200 if visible else 404)
                assert (b"Subject: m" in raw.content) == visible
    assert world.all_messages(checked) == world.cli_messages(checked)

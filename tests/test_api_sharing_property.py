"""Property: whatever the sharing changes made through the API, no response ever holds a
message its viewer may not see, and each viewer's listing is exactly what the sharing rules
(and `mailingest messages --viewer`) give. `mailingest run` and a real Dovecot, as in
test_api_dovecot.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api_support import RECORDS, SENDERS, ApiWorld, mail
from dovecot import Dovecot

OWNERS = ("alice", "bob")
VIEWERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> Iterator[ApiWorld]:
    world = ApiWorld(tmp_path_factory.mktemp("api-property"), dovecot)
    world.import_records()
    world.make_tokens()
    world.alice.deliver_many([mail(n, s) for n, s in enumerate(SENDERS)])
    world.bob.deliver_many([mail(10 + n, s) for n, s in enumerate(SENDERS)])
    with world.running() as daemon:
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
    viewer: str, owner: str, records: tuple[str, ...], flags: set[tuple[str, str]]
) -> bool:
    """Custom mode: the owner's own, else shared when the owner flagged a linked record."""
    return viewer == owner or any((owner, r) in flags for r in records)


#: One change: (owner, record, on, who asks: the owner, an admin, or the CRM acting for them).
CHANGES = st.lists(
    st.tuples(
        st.sampled_from(OWNERS),
        st.sampled_from(RECORDS),
        st.booleans(),
        st.sampled_from(("owner", "admin", "crm")),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=20, deadline=None)
@given(changes=CHANGES, checked=st.sampled_from(VIEWERS))
def test_no_response_holds_mail_the_viewer_may_not_see(
    world: ApiWorld, changes: list[tuple[str, str, bool, str]], checked: str
) -> None:
    truth = _truth(world)
    assert len(truth) == 2 * len(SENDERS)
    for owner in OWNERS:  # every example starts with no flag set
        for record in RECORDS:
            world.send("DELETE", owner, f"/records/{record}/shares/{owner}").raise_for_status()
    flags: set[tuple[str, str]] = set()
    for owner, record, on, asker in changes:
        who, headers = {
            "owner": (owner, {}),
            "admin": ("admin", {}),
            "crm": ("crm", {"X-Act-As": owner}),
        }[asker]
        method = "PUT" if on else "DELETE"
        response = world.send(method, who, f"/records/{record}/shares/{owner}", headers=headers)
        assert response.status_code == 200, response.text
        (flags.add if on else flags.discard)((owner, record))
        for viewer in VIEWERS:
            listed = world.all_messages(viewer)
            allowed = {i for i, (o, r) in truth.items() if _may_see(viewer, o, r, flags)}
            assert {m["id"] for m in listed} == allowed, (viewer, flags)
            for message_id, (message_owner, records) in truth.items():
                one = world.get(viewer, f"/messages/{message_id}")
                visible = _may_see(viewer, message_owner, records, flags)
                assert one.status_code == (200 if visible else 404), (viewer, message_id)
                raw = world.get(viewer, f"/messages/{message_id}/raw")
                assert raw.status_code == (200 if visible else 404)
                assert (b"Subject: m" in raw.content) == visible
    assert world.all_messages(checked) == world.cli_messages(checked)

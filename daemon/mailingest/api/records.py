"""CRM records: list, upsert, change addresses, delete; an owner's share flags.

Records are the CRM's: an admin token or its service token (``--act-for``) changes them.
A share flag is its owner's: that owner's token (or one acting for them) or an admin's.
Every change re-tags the stored mail in the same transaction, as the CLI's commands do.
A record id in a path is checked first (crm.record_id_problem): 422 naming ``id``.
"""

from __future__ import annotations

from aiohttp import web

from mailingest import commands, crm
from mailingest.api.errors import ApiError, json_object, known_keys, strings, text
from mailingest.api.host import caller_of, host_of
from mailingest.api.tokens import USER_RE
from mailingest.errors import DataError
from mailingest.model import Record


async def list_records(request: web.Request) -> web.Response:
    records = await host_of(request).store.records()
    return web.json_response({"records": [r.to_json() for r in records]})


def _record_id(request: web.Request) -> str:
    record_id = request.match_info["id"]
    problem = crm.record_id_problem(record_id)
    if problem is not None:
        raise ApiError(422, problem, field="id")
    return record_id


def _editor(request: web.Request) -> None:
    if not caller_of(request).may_edit_records:
        raise ApiError(403, "records are changed by an admin or the CRM's service token")


def _emails(values: list[str]) -> tuple[str, ...]:
    addresses, bad = crm.parse_emails(";".join(values))
    if bad or not addresses or any(";" in v for v in values):
        raise ApiError(
            422, f"not an address: {', '.join(map(repr, bad or values))}", field="emails"
        )
    return addresses


async def put_record(request: web.Request) -> web.Response:
    """Create or replace a record (kind, name, addresses); its mail links at once."""
    _editor(request)
    record_id = _record_id(request)
    data = await json_object(request)
    known_keys(data, ("kind", "name", "emails"))
    kind = text(data, "kind")
    if kind not in crm.KINDS:
        raise ApiError(422, f"expected one of {', '.join(crm.KINDS)}", field="kind")
    record = Record(record_id, kind, text(data, "name", ""), _emails(strings(data, "emails")))
    host = host_of(request)
    await host.store.import_records([record], crm.policies(host.config))
    return web.json_response({"record": record.to_json()})


async def put_emails(request: web.Request) -> web.Response:
    """Address change: links stay, stored mail from the new addresses links now."""
    _editor(request)
    record_id = _record_id(request)
    data = await json_object(request)
    known_keys(data, ("emails",))
    emails = _emails(strings(data, "emails"))
    host = host_of(request)
    if not await host.store.set_record_emails(record_id, emails, crm.policies(host.config)):
        raise ApiError(404, f"no record {record_id!r}")
    return web.json_response({"record": record_id, "emails": list(emails)})


async def delete_record(request: web.Request) -> web.Response:
    if not caller_of(request).admin:
        raise ApiError(403, "deleting a record needs an admin token")
    record_id = _record_id(request)
    host = host_of(request)
    policies = crm.policies(host.config)
    actor = caller_of(request).actor
    if not await host.store.delete_record(record_id, policies, actor=actor):
        raise ApiError(404, f"no record {record_id!r}")
    return web.json_response({"record": record_id, "deleted": True})


async def share(request: web.Request) -> web.Response:
    """PUT shares the owner's mail linked to the record (custom mode); DELETE stops."""
    caller, host = caller_of(request), host_of(request)
    record_id, owner = _record_id(request), request.match_info["owner"]
    on = request.method == "PUT"
    if not USER_RE.fullmatch(owner):
        raise ApiError(404, f"no user {owner!r}")
    if not caller.may_manage(owner):
        raise ApiError(403, f"only {owner!r} (or an admin) changes {owner!r}'s share flags")
    try:
        commands.check_share(host.config, owner, on)
    except DataError as exc:
        raise ApiError(422, str(exc), field="owner") from None
    policies = crm.policies(host.config)
    if not await host.store.set_share(owner, record_id, on, policies, actor=caller.actor):
        raise ApiError(404, f"no record {record_id!r}")
    notes = commands.share_notes(host.config, owner)
    return web.json_response({"record": record_id, "owner": owner, "shared": on, "notes": notes})

"""The OpenAPI 3.1 description served at /openapi.json; a test checks it against the routes
(api/app.py ROUTES) and the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from mailingest import __version__
from mailingest.api.openapi_accounts import ACCOUNT_PATHS
from mailingest.api.openapi_parts import (
    ID,
    NSTR,
    OPEN,
    RECORD_ID,
    SCHEMAS,
    SHARE,
    STR,
    STRS,
    body,
    errors,
    json,
    op,
    query,
    ref,
)
from mailingest.api.sending import MAX_RECIPIENTS

_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": op(
            "The process answers and the store is reachable (503: `store` is `unreachable`;"
            " the error is logged, not answered)",
            json({"type": "object"}),
            "503",
            security=OPEN,
        )
    },
    "/readyz": {
        "get": op(
            "Accounts loaded and the store takes writes (503: `accounts` is `loading` or"
            " `store` is `not_writable`); the write is tried at most every 5 s",
            json({"type": "object"}),
            "503",
            security=OPEN,
        )
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus text format (docs/metrics.md)",
            "security": OPEN,
            "responses": {"200": {"description": "OK", "content": {"text/plain": {"schema": STR}}}},
        }
    },
    "/openapi.json": {"get": op("This document", json({"type": "object"}), security=OPEN)},
    "/messages": {
        "get": op(
            "What the caller may see, newest first, a page at a time",
            json(
                {
                    "type": "object",
                    "properties": {
                        "messages": {"type": "array", "items": ref("Message")},
                        "next_cursor": {
                            **NSTR,
                            "description": "pass as `cursor` for the next page",
                        },
                    },
                }
            ),
            "401 403 422 503",
            parameters=[
                query(
                    "record",
                    STR,
                    "only mail linked to this record (not blank, at most 200 characters, no"
                    " control character: else 422, field record)",
                ),
                query("account", STR, "only this account's mail"),
                query("label", STR, "only mail with this label"),
                query("quarantined", {"enum": ["true", "false"]}, "only mail over its size limit"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size (50)"),
                query("cursor", STR, "the previous page's next_cursor"),
            ],
        ),
        "post": op(
            "Send from one of the caller's accounts over SMTP (`send`); stored as sent",
            json(ref("Sent")),
            "401 403 413 422 502 503",
            requestBody=body(
                {
                    "type": "object",
                    "required": ["account", "to"],
                    "additionalProperties": False,
                    "properties": {
                        "account": STR,
                        "to": {**STRS, "minItems": 1, "maxItems": MAX_RECIPIENTS},
                        "cc": {
                            **STRS,
                            "maxItems": MAX_RECIPIENTS,
                            "description": f"to and cc: at most {MAX_RECIPIENTS} in all",
                        },
                        "subject": STR,
                        "body": STR,
                    },
                }
            ),
        ),
    },
    "/messages/{id}/reply": {
        "post": op(
            "Reply from the caller's primary account (`reply`); `all` copies the others"
            f" (at most {MAX_RECIPIENTS} recipients in all, else 422)",
            json(ref("Sent")),
            "401 403 404 413 422 502 503",
            parameters=[ID],
            requestBody=body(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"body": STR, "all": {"type": "boolean"}},
                }
            ),
        )
    },
    "/messages/{id}": {
        "get": op(
            "One message, its decoded text/HTML parts and attachments",
            json(ref("MessageBody")),
            "401 403 404 503",
            parameters=[ID],
        )
    },
    "/messages/{id}/raw": {
        "get": {
            "summary": "The exact stored bytes, streamed",
            "parameters": [ID],
            "responses": {
                "200": {"description": "OK", "content": {"message/rfc822": {"schema": STR}}},
                **errors(401, 403, 404, 503),
            },
        }
    },
    "/records": {
        "get": op(
            "The CRM records and their addresses",
            json(
                {
                    "type": "object",
                    "properties": {"records": {"type": "array", "items": ref("Record")}},
                }
            ),
            "401 403 503",
        )
    },
    "/records/{id}": {
        "put": op(
            "Create or replace a record; its stored mail links and re-tags at once"
            " (admin or service token)",
            json({"type": "object", "properties": {"record": ref("Record")}}),
            "401 403 413 422 503",
            parameters=[RECORD_ID],
            requestBody=body(
                {
                    "type": "object",
                    "required": ["kind", "emails"],
                    "additionalProperties": False,
                    "properties": {
                        "kind": {"enum": ["lead", "contact"]},
                        "name": STR,
                        "emails": STRS,
                    },
                }
            ),
        ),
        "delete": op(
            "Forget a record: links and share flags go, its mail re-tags (admin token)",
            json({"type": "object", "properties": {"record": STR, "deleted": {"type": "boolean"}}}),
            "401 403 404 422 503",
            parameters=[RECORD_ID],
        ),
    },
    "/records/{id}/emails": {
        "put": op(
            "Change a record's addresses; links stay, mail from the new ones links now",
            json({"type": "object", "properties": {"record": STR, "emails": STRS}}),
            "401 403 404 413 422 503",
            parameters=[RECORD_ID],
            requestBody=body(
                {
                    "type": "object",
                    "required": ["emails"],
                    "additionalProperties": False,
                    "properties": {"emails": STRS},
                }
            ),
        )
    },
    "/records/{id}/shares/{owner}": {
        method: op(
            f"Custom mode: {what} the owner's mail linked to the record (the owner or an admin)",
            json(
                {
                    "type": "object",
                    "properties": {
                        "record": STR,
                        "owner": STR,
                        "shared": {"type": "boolean"},
                        "notes": STRS,
                    },
                }
            ),
            "401 403 404 422 503",
            parameters=SHARE,
        )
        for method, what in (("put", "share"), ("delete", "stop sharing"))
    },
}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailingest",
            "version": __version__,
            "description": "The CRM's way in: stored mail as each user may see it, CRM records "
            "and share flags, account status. Send `Authorization: Bearer TOKEN`; a service "
            "token made with `--act-for` may add `X-Act-As: USER`.",
        },
        "security": [{"bearer": []}],
        "paths": _PATHS | ACCOUNT_PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

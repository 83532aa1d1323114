"""The OpenAPI 3.1 description served at /openapi.json; a test checks it against the routes
(api/app.py ROUTES) and the OpenAPI schema."""

from __future__ import annotations

from typing import Any

from mailingest import __version__

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_STRS = {"type": "array", "items": _STR}
_INT = {"type": "integer"}

_MESSAGE = {
    "type": "object",
    "description": "As `mailingest messages --json` prints one message.",
    "required": ["id", "account", "owner", "direction", "from", "to", "cc", "subject", "date"],
    "properties": {
        "id": _INT,
        "account": _STR,
        "owner": _STR,
        "direction": {"enum": ["in", "out"]},
        "from": _NSTR,
        "to": _STRS,
        "cc": _STRS,
        "subject": _NSTR,
        "date": _NSTR,
        "message_id": _NSTR,
        "records": _STRS,
        "visibility": {"enum": ["private", "shared"]},
        "reason": _STR,
        "labels": _STRS,
        "size": _INT,
        "sha256": _STR,
        "received_at": _STR,
        "quarantined": {"type": "boolean"},
        "quarantine_reason": _NSTR,
    },
}
_MESSAGE_BODY = {
    "allOf": [
        {"$ref": "#/components/schemas/Message"},
        {
            "type": "object",
            "properties": {
                "parts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"enum": ["text/plain", "text/html"]}, "text": _STR},
                    },
                },
                "attachments": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"filename": _NSTR, "type": _STR, "size": _INT},
                    },
                },
                "body_omitted": _NSTR,
            },
        },
    ]
}
_RECORD = {
    "type": "object",
    "required": ["id", "kind", "name", "emails"],
    "properties": {
        "id": _STR,
        "kind": {"enum": ["lead", "contact"]},
        "name": _STR,
        "emails": _STRS,
    },
}
_ERROR = {
    "type": "object",
    "required": ["status", "error", "message", "field"],
    "properties": {
        "status": _INT,
        "error": _STR,
        "message": _STR,
        "field": {**_NSTR, "description": "the input at fault (422)"},
    },
}
_SENT = {
    "type": "object",
    "description": "As `mailingest send --json` prints it.",
    "properties": {
        "id": _INT,
        "message_id": _STR,
        "account": _STR,
        "visibility": _STR,
        "reason": _STR,
        "refused": _STRS,
    },
}
_SCHEMAS = {
    "Sent": _SENT,
    "Message": _MESSAGE,
    "MessageBody": _MESSAGE_BODY,
    "Record": _RECORD,
    "Error": _ERROR,
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        401: "no token, or an unknown or revoked one",
        403: "the token may not do this",
        404: "no such id, or mail the caller may not see",
        413: "body over 1 MiB",
        422: "bad input; `field` names it",
        502: "the SMTP server refused or failed the send",
        503: "the store is unavailable (or the SMTP server, for now: retry later)",
    }
    return {str(c): _json(_ref("Error"), meaning[c]) for c in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or _STR}


def _op(summary: str, ok: dict[str, Any], codes: str = "", **more: Any) -> dict[str, Any]:
    """One operation; ``codes``: its error statuses, e.g. "401 404"."""
    op = {"summary": summary, "responses": {"200": ok, **_errors(*map(int, codes.split()))}}
    return op | more


_OPEN: list[dict[str, list[str]]] = []  # no token needed
_ID = _path("id", {"type": "integer", "minimum": 0})
_SHARE = [_path("id"), _path("owner")]


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": _op(
            "The process answers and the store is reachable",
            _json({"type": "object"}),
            "503",
            security=_OPEN,
        )
    },
    "/readyz": {
        "get": _op(
            "Accounts loaded and the store takes writes",
            _json({"type": "object"}),
            "503",
            security=_OPEN,
        )
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus text format (docs/metrics.md)",
            "security": _OPEN,
            "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": _STR}}}
            },
        }
    },
    "/openapi.json": {"get": _op("This document", _json({"type": "object"}), security=_OPEN)},
    "/messages": {
        "get": _op(
            "What the caller may see, newest first, a page at a time",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "messages": {"type": "array", "items": _ref("Message")},
                        "next_cursor": {
                            **_NSTR,
                            "description": "pass as `cursor` for the next page",
                        },
                    },
                }
            ),
            "401 403 422 503",
            parameters=[
                _query("record", _STR, "only mail linked to this record"),
                _query("account", _STR, "only this account's mail"),
                _query("label", _STR, "only mail with this label"),
                _query("quarantined", {"enum": ["true", "false"]}, "only mail over its size limit"),
                _query(
                    "limit", {"type": "integer", "minimum": 1, "maximum": 500}, "page size (50)"
                ),
                _query("cursor", _STR, "the previous page's next_cursor"),
            ],
        ),
        "post": _op(
            "Send from one of the caller's accounts over SMTP (`send`); stored as sent",
            _json(_ref("Sent")),
            "401 403 413 422 502 503",
            requestBody=_body(
                {
                    "type": "object",
                    "required": ["account", "to"],
                    "additionalProperties": False,
                    "properties": {
                        "account": _STR,
                        "to": _STRS,
                        "cc": _STRS,
                        "subject": _STR,
                        "body": _STR,
                    },
                }
            ),
        ),
    },
    "/messages/{id}/reply": {
        "post": _op(
            "Reply from the caller's primary account (`reply`); `all` copies the others",
            _json(_ref("Sent")),
            "401 403 404 413 422 502 503",
            parameters=[_ID],
            requestBody=_body(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"body": _STR, "all": {"type": "boolean"}},
                }
            ),
        )
    },
    "/messages/{id}": {
        "get": _op(
            "One message, its decoded text/HTML parts and attachments",
            _json(_ref("MessageBody")),
            "401 403 404 503",
            parameters=[_ID],
        )
    },
    "/messages/{id}/raw": {
        "get": {
            "summary": "The exact stored bytes, streamed",
            "parameters": [_ID],
            "responses": {
                "200": {"description": "OK", "content": {"message/rfc822": {"schema": _STR}}},
                **_errors(401, 403, 404, 503),
            },
        }
    },
    "/records": {
        "get": _op(
            "The CRM records and their addresses",
            _json(
                {
                    "type": "object",
                    "properties": {"records": {"type": "array", "items": _ref("Record")}},
                }
            ),
            "401 403 503",
        )
    },
    "/records/{id}": {
        "put": _op(
            "Create or replace a record; its stored mail links and re-tags at once"
            " (admin or service token)",
            _json({"type": "object", "properties": {"record": _ref("Record")}}),
            "401 403 413 422 503",
            parameters=[_path("id")],
            requestBody=_body(
                {
                    "type": "object",
                    "required": ["kind", "emails"],
                    "additionalProperties": False,
                    "properties": {
                        "kind": {"enum": ["lead", "contact"]},
                        "name": _STR,
                        "emails": _STRS,
                    },
                }
            ),
        ),
        "delete": _op(
            "Forget a record: links and share flags go, its mail re-tags (admin token)",
            _json(
                {"type": "object", "properties": {"record": _STR, "deleted": {"type": "boolean"}}}
            ),
            "401 403 404 503",
            parameters=[_path("id")],
        ),
    },
    "/records/{id}/emails": {
        "put": _op(
            "Change a record's addresses; links stay, mail from the new ones links now",
            _json({"type": "object", "properties": {"record": _STR, "emails": _STRS}}),
            "401 403 404 413 422 503",
            parameters=[_path("id")],
            requestBody=_body(
                {
                    "type": "object",
                    "required": ["emails"],
                    "additionalProperties": False,
                    "properties": {"emails": _STRS},
                }
            ),
        )
    },
    "/records/{id}/shares/{owner}": {
        method: _op(
            f"Custom mode: {what} the owner's mail linked to the record (the owner or an admin)",
            _json(
                {
                    "type": "object",
                    "properties": {
                        "record": _STR,
                        "owner": _STR,
                        "shared": {"type": "boolean"},
                        "notes": _STRS,
                    },
                }
            ),
            "401 403 404 422 503",
            parameters=_SHARE,
        )
        for method, what in (("put", "share"), ("delete", "stop sharing"))
    },
    "/accounts": {
        "get": _op(
            "Every account: last poll, result, stored, paused, next poll (as `status --json`)",
            _json(
                {
                    "type": "object",
                    "properties": {"accounts": {"type": "array", "items": {"type": "object"}}},
                }
            ),
            "401 403 503",
        )
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
        "paths": _PATHS,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

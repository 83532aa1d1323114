"""The parts the OpenAPI description is made of: schemas and builders of operations."""

from __future__ import annotations

from typing import Any

from mailingest.crm import MAX_RECORD_ID

STR = {"type": "string"}
NSTR = {"type": ["string", "null"]}
STRS = {"type": "array", "items": STR}
INT = {"type": "integer"}

MESSAGE = {
    "type": "object",
    "description": "As `mailingest messages --json` prints one message.",
    "required": ["id", "account", "owner", "direction", "from", "to", "cc", "subject", "date"],
    "properties": {
        "id": INT,
        "account": STR,
        "owner": STR,
        "direction": {"enum": ["in", "out"]},
        "from": NSTR,
        "to": STRS,
        "cc": STRS,
        "subject": NSTR,
        "date": NSTR,
        "message_id": NSTR,
        "records": STRS,
        "visibility": {"enum": ["private", "shared"]},
        "reason": STR,
        "labels": STRS,
        "size": INT,
        "sha256": STR,
        "received_at": STR,
        "quarantined": {"type": "boolean"},
        "quarantine_reason": NSTR,
    },
}
MESSAGE_BODY = {
    "allOf": [
        {"$ref": "#/components/schemas/Message"},
        {
            "type": "object",
            "properties": {
                "parts": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"type": {"enum": ["text/plain", "text/html"]}, "text": STR},
                    },
                },
                "attachments": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"filename": NSTR, "type": STR, "size": INT},
                    },
                },
                "body_omitted": NSTR,
            },
        },
    ]
}
RECORD = {
    "type": "object",
    "required": ["id", "kind", "name", "emails"],
    "properties": {
        "id": STR,
        "kind": {"enum": ["lead", "contact"]},
        "name": STR,
        "emails": STRS,
    },
}
ERROR = {
    "type": "object",
    "required": ["status", "error", "message", "field"],
    "properties": {
        "status": INT,
        "error": STR,
        "message": STR,
        "field": {**NSTR, "description": "the input at fault (422)"},
    },
}
SENT = {
    "type": "object",
    "description": "As `mailingest send --json` prints it.",
    "properties": {
        "id": INT,
        "message_id": STR,
        "account": STR,
        "visibility": STR,
        "reason": STR,
        "refused": STRS,
    },
}
SCHEMAS = {
    "Sent": SENT,
    "Message": MESSAGE,
    "MessageBody": MESSAGE_BODY,
    "Record": RECORD,
    "Error": ERROR,
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def errors(*codes: int) -> dict[str, Any]:
    meaning = {
        401: "no token, or an unknown or revoked one",
        403: "the token may not do this",
        404: "no such id, or mail or an account the caller may not see",
        409: "an account of the config file (edit the file), a name taken, a paused account",
        413: "body over 1 MiB",
        422: "bad input; `field` names it",
        502: "the SMTP server refused or failed the send",
        503: "the store is unavailable (or the SMTP server, for now: retry later)",
    }
    return {str(c): json(ref("Error"), meaning[c]) for c in codes}


def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or STR}


def op(summary: str, ok: dict[str, Any], codes: str = "", **more: Any) -> dict[str, Any]:
    """One operation; ``codes``: its error statuses, e.g. "401 404"."""
    op = {"summary": summary, "responses": {"200": ok, **errors(*map(int, codes.split()))}}
    return op | more


OPEN: list[dict[str, list[str]]] = []  # no token needed
ID = path("id", {"type": "integer", "minimum": 0})
RECORD_ID = path(
    "id",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_RECORD_ID,
        "description": "not blank, no control character or line break (else 422, field id)",
    },
)
SHARE = [RECORD_ID, path("owner")]


def body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}

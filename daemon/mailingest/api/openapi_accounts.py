"""The OpenAPI description of the accounts routes (api/accounts.py, GET /accounts)."""

from __future__ import annotations

from typing import Any

from mailingest.api.openapi_parts import INT, NSTR, STR, STRS, body, errors, json, op, path

_NAME = [path("name")]
_STRS_OR_NULL = {"type": ["array", "null"], "items": STR}
_SETTINGS = {
    "sharing": {"enum": ["private", "custom", "public"]},
    "excluded_domains": _STRS_OR_NULL,
    "magnet_label": NSTR,
    "from_address": NSTR,
    "aliases": _STRS_OR_NULL,
    "primary": {"type": ["boolean", "null"]},
}
_POP3 = {
    "type": ["object", "null"],
    "properties": {
        "status": STR,
        "error": NSTR,
        "capabilities": STRS,
        "messages": {"type": ["integer", "null"]},
    },
}
_OBJECT = {"type": "object"}

ACCOUNT_PATHS: dict[str, Any] = {
    "/accounts": {
        "get": op(
            "The caller's accounts (an admin's: every account): last poll, result, stored,"
            " paused, next poll (as `status --json`)",
            json(
                {"type": "object", "properties": {"accounts": {"type": "array", "items": _OBJECT}}}
            ),
            "401 403 503",
        ),
        "post": op(
            "Add an account, tested first as `accounts add` does (nothing stored if the login"
            " fails: 422 naming password or host, with the status and a fixed cause; an admin"
            " gets the server's words); the owner's token (only for themselves, always"
            " tested) or an admin's",
            json(
                {
                    "type": "object",
                    "properties": {"account": STR, "added": {"const": True}, "pop3": _POP3},
                }
            ),
            "401 403 409 413 422 503",
            requestBody=body(
                {
                    "type": "object",
                    "required": ["name", "owner", "host", "username", "password"],
                    "additionalProperties": False,
                    "properties": {
                        **{k: STR for k in ("name", "owner", "host", "username", "password")},
                        "port": INT,
                        "security": {"enum": ["tls", "starttls", "plain"]},
                        "allow_plaintext": {"type": "boolean"},
                        "leave_on_server": {"type": "boolean"},
                        "delete_after_days": INT,
                        "poll_interval": STR,
                        "timeout": STR,
                        "max_message_size": {"type": ["string", "integer"]},
                        "test": {
                            "type": "boolean",
                            "default": True,
                            "description": "false: store it untested (admin token only)",
                        },
                        **_SETTINGS,
                    },
                }
            ),
        ),
    },
    "/accounts/{name}": {
        "get": op(
            "One account's sharing settings, and where it is defined (config or database);"
            " another owner's account is 404 to a non-admin",
            json(
                {
                    "type": "object",
                    "properties": {"account": STR, "owner": STR, "source": STR, **_SETTINGS},
                }
            ),
            "401 403 404 503",
            parameters=_NAME,
        ),
        "patch": op(
            "Change an account's sharing settings (`accounts set`; null removes a key); its"
            " mail re-tags before the answer; the owner's token or an admin's",
            json({"type": "object", "properties": {"account": STR, "changed": STRS}}),
            "401 403 404 409 413 422 503",
            parameters=_NAME,
            requestBody=body(
                {"type": "object", "additionalProperties": False, "properties": _SETTINGS}
            ),
        ),
    },
    "/accounts/{name}/check": {
        "post": op(
            "Log in now (POP3, then SMTP), nothing changed: `check --json`'s entry",
            json(
                {
                    "type": "object",
                    "properties": {
                        "account": STR,
                        "pop3": _POP3,
                        "smtp": {"type": ["object", "null"]},
                    },
                }
            ),
            "401 403 404 503",
            parameters=_NAME,
        )
    },
    "/accounts/{name}/fetch": {
        "post": {
            "summary": "Poll the account at once; GET /accounts shows the result",
            "parameters": _NAME,
            "responses": {
                "202": json(
                    {"type": "object", "properties": {"account": STR, "poll": STR}}, "requested"
                ),
                **errors(401, 403, 404, 409, 503),
            },
        }
    },
}

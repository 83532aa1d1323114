"""The API's one error shape, and reading a JSON body and query values into it.

Every failure is ``{"status", "error", "message", "field"}`` with the HTTP status: 401 no
or bad token, 403 not allowed, 404 unknown id (or mail the caller may not see), 413 body
too large, 422 bad input (``field`` names it), 502 the SMTP server failed a send, 503 the
store (or the SMTP server, for now) is unavailable. Never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid",
    500: "internal",
    502: "smtp_failed",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def response(self) -> web.Response:
        return error_response(self.status, self.message, field=self.field)


def error_response(status: int, message: str, *, field: str | None = None) -> web.Response:
    body = {
        "status": status,
        "error": CODES.get(status, "error"),
        "message": message,
        "field": field,
    }
    response = web.json_response(body, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mailingest"'
    return response


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body, a JSON object (aiohttp refuses one over the size limit: 413)."""
    raw = await request.read()
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, f"the body is not valid JSON: {exc}", field="body") from None
    except RecursionError:
        raise ApiError(422, "the body nests too deep", field="body") from None
    if not isinstance(data, dict):
        raise ApiError(422, "expected a JSON object as the body", field="body")
    if not _storable(data):
        raise ApiError(
            422, "a string holds a NUL or a lone surrogate (not storable text)", field="body"
        )
    return data


def _storable(value: Any) -> bool:
    """Every string encodes as UTF-8 and holds no NUL (PostgreSQL refuses both)."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    return True


def known_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str = "") -> None:
    for key in data:
        if key not in allowed:
            raise ApiError(
                422, f"unknown key; allowed: {', '.join(allowed)}", field=f"{where}{key}"
            )


def text(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or (default is None and not value.strip()):
        wanted = "a string" if default is not None else "a non-empty string"
        raise ApiError(422, f"expected {wanted}", field=key)
    return value


def strings(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(422, "expected an array of strings", field=key)
    return value


def query_int(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    value = request.query.get(key)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not low <= int(value) <= high:
        raise ApiError(422, f"expected an integer from {low} to {high}", field=key)
    return int(value)


def query_bool(request: web.Request, key: str) -> bool:
    value = request.query.get(key, "false")
    if value not in ("true", "false"):
        raise ApiError(422, "expected true or false", field=key)
    return value == "true"

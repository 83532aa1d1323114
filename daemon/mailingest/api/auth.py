"""Who is asking: a bearer token names a CRM user; a service token (created with
``--act-for``) may name another with ``X-Act-As``; an admin token may manage anyone's
sharing. The store keeps each token's SHA-256 only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from mailingest.api.errors import ApiError
from mailingest.api.tokens import USER_RE, token_hash
from mailingest.model import ApiToken
from mailingest.store import Store

ACT_AS = "X-Act-As"


@dataclass(frozen=True, slots=True)
class Caller:
    user: str  # whose view and rights apply: the X-Act-As user, else the token's
    token: ApiToken

    @property
    def admin(self) -> bool:
        return self.token.admin

    @property
    def actor(self) -> str:
        """Who made a change, for the audit log."""
        if self.user == self.token.user:
            return f"api:{self.user}"
        return f"api:{self.token.user} for {self.user}"

    def may_manage(self, owner: str) -> bool:
        """Changing an owner's sharing needs that owner (or one acting for them), or admin.
        The same holds for seeing an owner's accounts at all: others' are answered as
        absent, so account names do not leak."""
        return self.admin or self.user == owner

    @property
    def may_edit_records(self) -> bool:
        """Records are the CRM's: its service token (act-for) or an admin changes them."""
        return self.admin or self.token.act_for


async def authenticate(request: web.Request, store: Store) -> Caller:
    hashed = bearer(request)
    return caller_for(await store.api_token(hashed), request.headers.get(ACT_AS))


def bearer(request: web.Request) -> str:
    """The SHA-256 of the request's bearer token (401 without one)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "send Authorization: Bearer TOKEN (`mailingest api token create`)")
    return token_hash(token)


def caller_for(found: ApiToken | None, act_as: str | None) -> Caller:
    """Who asks, from the stored token (None: unknown or revoked) and ``X-Act-As``."""
    if found is None:
        raise ApiError(401, "unknown or revoked token")
    if act_as is None:
        return Caller(found.user, found)
    if not found.act_for:
        raise ApiError(403, f"this token may not act for another user ({ACT_AS})")
    if not USER_RE.fullmatch(act_as):
        raise ApiError(422, "not a user name", field=ACT_AS)
    return Caller(act_as, found)


def viewer_of(act_as: str | None) -> Callable[[ApiToken], str | None]:
    """Whose view a stored token gets (None: the request fails, read nothing), for a read
    that looks the token up itself (``Store.messages_for``); ``caller_for`` then says why."""

    def viewer(found: ApiToken) -> str | None:
        try:
            return caller_for(found, act_as).user
        except ApiError:
            return None

    return viewer

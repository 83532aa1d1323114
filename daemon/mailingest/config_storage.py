"""The config's ``[storage]`` table: where the store is (a SQLite file, or a PostgreSQL URL
that must not hold its password) and the key that seals the secrets kept in it."""

from __future__ import annotations

from pathlib import Path

from mailingest.config_values import Context, Secret, Table, secret
from mailingest.settings import StorageSettings

_STORAGE_KEYS = ("database", "password", "secret_key")
#: The shortest secret_key accepted (characters).
SECRET_KEY_MIN = 16


def storage_settings(t: Table, ctx: Context) -> StorageSettings:
    t.check_keys(_STORAGE_KEYS)
    key = _secret_key(t, ctx)
    if "database" in t.data:
        database = t.string("database")
        if database.startswith(("postgresql://", "postgres://")):
            return StorageSettings(_postgres_url(t, database), _db_password(t, ctx), key)
        if "password" in t.data:
            raise t.error("password", "only a postgresql:// database takes a password")
        return StorageSettings(ctx.resolve(database), secret_key=key)
    if "password" in t.data:
        raise t.error("password", "only a postgresql:// database takes a password")
    state = ctx.environ.get("STATE_DIRECTORY", "").split(":")[0]  # systemd StateDirectory=
    default = Path(state) / "mail.db" if state else ctx.base / "mail.db"
    return StorageSettings(default, secret_key=key)


def _secret_key(t: Table, ctx: Context) -> Secret | None:
    if "secret_key" not in t.data:
        return None

    def long_enough(key: Secret) -> Secret:
        if len(key.value) < SECRET_KEY_MIN:
            raise t.error(
                "secret_key",
                f"the key ({key.describe()}) is shorter than {SECRET_KEY_MIN} characters; "
                "make one with: openssl rand -base64 32",
            )
        return key

    return secret(t, "secret_key", ctx, lazy=True, check=long_enough)


def _postgres_url(t: Table, url: str) -> str:
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    if at and ":" in userinfo:
        # Never echo the URL: it holds the password.
        raise t.error(
            "database",
            "the URL holds a password; move it to storage.password "
            '(password = { env = "VAR" }, { file = ... } or { credential = ... })',
        )
    if "password=" in rest.partition("?")[2]:
        raise t.error("database", "the URL holds a password; move it to storage.password")
    return url


def _db_password(t: Table, ctx: Context) -> Secret | None:
    return secret(t, "password", ctx) if "password" in t.data else None

"""`mailingest config`: the effective configuration as TOML, every default filled in and
every secret described by where it comes from, never by what it is."""

from __future__ import annotations

import dataclasses
from typing import Any

from mailingest.config import Config
from mailingest.config_values import UNIT_SECONDS, Secret, toml_str


def render_config(config: Config) -> str:
    """The effective config as TOML: defaults filled in, paths resolved, secrets described."""
    lines = [f"# effective configuration of {toml_str(str(config.path))}", "", "[storage]"]
    lines += _render_fields(config.storage)
    lines += ["", "[daemon]", *_render_fields(config.daemon)]
    if config.api is not None:
        lines += ["", "[api]", *_render_fields(config.api)]
    for account in config.accounts:
        lines += ["", "[[accounts]]", *_render_fields(account)]
        if account.auth is not None:
            lines += ["", "[accounts.auth.oauth2]", *_render_fields(account.auth)]
        if account.smtp is not None:
            lines += ["", "[accounts.smtp]", *_render_fields(account.smtp)]
            if account.smtp.auth is not None:
                lines += ["", "[accounts.smtp.auth.oauth2]", *_render_fields(account.smtp.auth)]
    return "\n".join(lines) + "\n"


_UNSET = {
    "ca_file": "the system CA store",
    "daily_limit": "no limit",
    "magnet_label": "no label",
    "from_address": "the identity",
    "poll_interval": "the [daemon] poll_interval",
    "env_file": "{ env } secrets come from the process environment only",
    "tls_cert": "plain HTTP",
    "tls_key": "plain HTTP",
    "auth": "the password",
    "tenant": "none",
    "client_secret": "a public client",
    "refresh_token": "the one `mailingest auth login` stored",
    "private_key": "none",
    "subject": "none",
}


def _render_fields(obj: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in ("smtp", "seal_key") or (f.name == "auth" and value is not None):
            continue  # sections of their own; seal_key is storage.secret_key
        if f.name == "password" and value is None:
            continue  # OAuth2 sign-in: the auth.oauth2 table follows
        if value is None:
            lines.append(f"# {f.name}: not set ({_UNSET.get(f.name, 'default')})")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, Secret):
        return value.describe()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):  # every float in the config is a duration
        return _format_duration(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return toml_str(str(value))


def _format_duration(seconds: float) -> str:
    if not seconds.is_integer():
        return repr(seconds)
    rest, parts = int(seconds), []
    for unit, size in UNIT_SECONDS.items():
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return toml_str("".join(parts) or "0s")

"""The building blocks of config parsing: secrets, typed table getters whose errors name the
file and key, durations and sizes. A leaf, so the config's sections can live in modules of
their own (config.py, config_auth.py) without importing each other."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailingest.errors import ConfigError

_SECRET_KEYS = ("env", "file", "credential")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_UNIT_SECONDS = UNIT_SECONDS


@dataclass(frozen=True, slots=True)
class Secret:
    """A password and where it came from; repr and str never show the value."""

    source: str  # "literal" | "env" | "file" | "credential" | "database"
    ref: str  # "" for literal; else the variable name, file path or credential name
    value: str = field(repr=False)
    #: Reads the value at its first use (commands that log in nowhere never read it): a
    #: ConfigError naming the key if that fails.
    resolver: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    def reveal(self) -> str:
        if self.resolver is not None:
            object.__setattr__(self, "value", self.resolver())
            object.__setattr__(self, "resolver", None)
        return self.value

    @property
    def resolved(self) -> bool:
        return self.resolver is None

    def describe(self) -> str:
        """TOML text that says where the secret comes from, never what it is."""
        if self.source == "literal":
            return '"***"'
        return f"{{ {self.source} = {toml_str(self.ref)} }}"

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)


_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}


_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_duration(value: str | int | float, *, key_path: str = "") -> float:
    """Seconds from "90s", "5m", "2h", "1d", "1h30m" or a plain number of seconds (>= 0)."""
    expected = 'expected a duration such as "90s", "5m", "1h30m" or a number of seconds'
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        got = type_name(value)
        raise ConfigError(f"{expected}, got {got}", key_path=key_path or None)
    text = value.strip() if isinstance(value, str) else ""
    try:
        if not isinstance(value, str):
            seconds = float(value)
        elif _NUMBER_RE.fullmatch(text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text) and _units_in_order(text):
            parts = _DURATION_PART_RE.findall(text)
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in parts)
        else:
            seconds = math.nan
    except OverflowError:
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"{expected}, got {value!r}", key_path=key_path or None)
    return seconds


def _units_in_order(text: str) -> bool:
    """Reject "5m1h" or "1m1m": each unit at most once, largest first."""
    order = [list(_UNIT_SECONDS).index(unit) for _, unit in _DURATION_PART_RE.findall(text)]
    return all(a < b for a, b in itertools.pairwise(order))


class Context:
    """What resolution needs: the file (for errors), its directory, the environment."""

    def __init__(self, file: str, base: Path, environ: Mapping[str, str]) -> None:
        self.file = file
        self.base = base
        self.environ = environ
        #: The ``[daemon] env_file``'s variables (read at load), before ``environ``.
        self.env_file: Mapping[str, str] = {}
        self.env_path: Path | None = None
        self.env_error: ConfigError | None = None  # unreadable, raised where it is needed
        self.literals: list[str] = []  # key paths of literal passwords, for the mode check
        self.defer = False  # leave secrets marked lazy unread until used

    def resolve(self, value: str) -> Path:
        return Path(os.path.normpath(self.base / value))


class Table:
    """One TOML table and its key path: typed getters whose errors name file and key."""

    def __init__(self, data: Mapping[str, Any], file: str, prefix: str) -> None:
        self.data = data
        self.file = file
        self.prefix = prefix

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, key_path=self.path(key))

    def check_keys(self, allowed: Collection[str]) -> None:
        for key in self.data:
            if key not in allowed:
                import difflib  # a bad key only

                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise self.error(
                    key, f"unknown key; {hint}allowed keys: {', '.join(sorted(allowed))}"
                )

    def _get(self, key: str, kind: type, what: str) -> Any:
        value = self.data[key]
        # bool is a subclass of int in Python, but `port = true` is not a port.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(key, f"expected {what}, got {type_name(value)}")
        return value

    def missing(self, key: str) -> ConfigError:
        return self.error(key, f"missing required key; add {key} = ...")

    def string(self, key: str, default: str | None = None) -> str:
        if key not in self.data:
            if default is None:
                raise self.missing(key)
            return default
        text: str = self._get(key, str, "a string")
        if not text.strip():
            raise self.error(key, "must not be empty")
        return text

    def optional_string(self, key: str) -> str | None:
        """Absent or "" means not set."""
        return self.string(key) if self.data.get(key, "") != "" else None

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise self.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, "true or false")) if key in self.data else default

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        rng = f"{low}\N{EN DASH}{high}" if high is not None else f">= {low}"
        if key not in self.data:
            return default
        value: int = self._get(key, int, f"an integer {rng}")
        if value < low or (high is not None and value > high):
            raise self.error(key, f"expected an integer {rng}, got {value}")
        return value

    def duration(self, key: str, default: float) -> float:
        if key not in self.data:
            return default
        try:
            seconds = parse_duration(self.data[key], key_path=self.path(key))
        except ConfigError as exc:
            exc.file = self.file
            raise
        if seconds <= 0:
            raise self.error(key, f"expected a duration greater than zero, got {self.data[key]!r}")
        return seconds

    def size(self, key: str) -> int:
        """Bytes from 26214400, "25MB" (10**6), "25MiB" (2**20), "512kB", "1GiB"; 0 = none."""
        if key not in self.data:
            return 0
        value = self.data[key]
        found = _SIZE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if found is None:
            expected = 'expected a size such as "25MB", "10MiB" or a number of bytes'
            raise self.error(key, f"{expected}, got {value!r}")
        return int(float(found[1]) * _SIZE_UNITS[(found[2] or "b").lower()])

    def table(self, key: str) -> Table:
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {type_name(value)}")
        return Table(value, self.file, self.path(key))


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}


_TYPE_NAMES |= {list: "an array", dict: "a table"}


def type_name(value: object) -> str:
    """The TOML type of a value, never the value itself (it may be a secret)."""
    return _TYPE_NAMES.get(type(value), "a date/time")


def secret(
    t: Table,
    key: str,
    ctx: Context,
    *,
    lazy: bool = False,
    check: Callable[[Secret], Secret] | None = None,
    multiline: bool = False,
) -> Secret:
    """A literal string or exactly one of { env | file | credential }; errors never show it.

    ``lazy``: where the context defers secrets, read it at first use instead of now.
    ``multiline``: a PEM key, not a password sent on a protocol line."""
    if key not in t.data:
        raise t.error(key, f'missing required key; add {key} = {{ env = "VAR" }} (or file, ...)')
    raw = t.data[key]
    if isinstance(raw, Secret):  # an account kept in the database: already opened, or lazy
        return _checked(t, key, multiline, raw) if raw.resolved else raw
    if isinstance(raw, str):
        ctx.literals.append(t.path(key))
        secret = _checked(t, key, multiline, Secret("literal", "", raw))
        return check(secret) if check else secret
    if not isinstance(raw, dict):
        got = type_name(raw)
        raise t.error(key, f'expected a string or {{ env = "VAR" }}, {{ file = ... }}, got {got}')
    sub = Table(raw, ctx.file, t.path(key))
    sub.check_keys(_SECRET_KEYS)
    if len(raw) != 1:
        raise t.error(key, "expected exactly one of env, file, credential")
    source = next(iter(raw))
    ref = sub.string(source)

    def read() -> Secret:
        secret = _read_secret(t, key, ctx, source, ref, multiline)
        return check(secret) if check else secret

    if lazy and ctx.defer:
        shown = str(ctx.resolve(ref)) if source == "file" else ref
        return Secret(source, shown, "", resolver=lambda: read().value)
    return read()


def _read_secret(
    t: Table, key: str, ctx: Context, source: str, ref: str, multiline: bool = False
) -> Secret:
    if source == "env":
        if ctx.env_error is not None:
            raise ctx.env_error
        if ref in ctx.env_file:
            return _checked(t, key, multiline, Secret("env", ref, ctx.env_file[ref]))
        if ref in ctx.environ:
            return _checked(t, key, multiline, Secret("env", ref, ctx.environ[ref]))
        if ctx.env_path is not None:
            raise t.error(
                key, f"{ref} is neither in daemon.env_file ({ctx.env_path}) nor in the environment"
            )
        raise t.error(key, f"environment variable {ref} is not set; set it or use {{ file = ... }}")
    if source == "file":
        path = ctx.resolve(ref)
    else:
        directory = ctx.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise t.error(key, f"credential {ref!r} needs $CREDENTIALS_DIRECTORY (LoadCredential=)")
        if "/" in ref or ref in (".", ".."):
            raise t.error(key, f"expected a credential name without '/', got {ref!r}")
        path = Path(directory) / ref
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise t.error(key, f"cannot read {source} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise t.error(key, f"{source} {path} is not valid UTF-8") from exc
    # One trailing newline is how editors and `echo` end a file; it is not part of the password.
    text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    return _checked(
        t, key, multiline, Secret(source, ref if source == "credential" else str(path), text)
    )


def _checked(t: Table, key: str, multiline: bool, secret: Secret) -> Secret:
    if not secret.value:
        raise t.error(key, f"the password ({secret.describe()}) is empty")
    if not multiline and ("\r" in secret.value or "\n" in secret.value):
        raise t.error(
            key,
            f"the password ({secret.describe()}) contains a line break; POP3 servers such as "
            "Gmail answer +OK and then desynchronise; remove it",
        )
    if "\0" in secret.value:
        raise t.error(key, f"the password ({secret.describe()}) contains a NUL byte; remove it")
    try:
        secret.value.encode("utf-8")
    except UnicodeEncodeError:  # an environment variable holding bytes that are not UTF-8
        raise t.error(key, f"the password ({secret.describe()}) is not valid UTF-8 text") from None
    return secret


def toml_str(text: str) -> str:
    """A TOML basic string: JSON's escapes are valid TOML; DEL must be escaped too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")

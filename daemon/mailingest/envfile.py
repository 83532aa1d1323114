"""``[daemon] env_file``: ``NAME=value`` lines that ``{ env = "NAME" }`` secrets read first.

systemd's ``EnvironmentFile=`` (like any process environment) is fixed when the service
starts, so a password kept there needs a restart to change. This file is read on every
config load instead, so ``systemctl reload`` (SIGHUP) brings a changed password.

It reads like a shell's assignments or an ``EnvironmentFile=``: one ``NAME=value`` a line,
blank lines and lines starting with ``#`` ignored, an optional ``export `` prefix, spaces
around the value dropped unless it is quoted. A value that starts and ends with the same
quote (single or double) is what lies between them, taken literally: there is no
expansion, escaping or line continuation, so a password's dollars, backslashes and
backquotes need no care.

No error message ever holds a value: a malformed line is named by its number only.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTES = ("'", '"')


class EnvFileError(ValueError):
    """The env file cannot be used; the message names the problem, never a value."""


def read_env_file(path: Path) -> dict[str, str]:
    """The file's variables; EnvFileError when it is unreadable, shared or malformed.

    Like a config file holding a literal password, a file that group or others may read
    or write is refused: it holds passwords."""
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise EnvFileError(f"{path} is not a regular file")
            data = handle.read()
    except OSError as exc:
        raise EnvFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise EnvFileError(
            f"{path} holds passwords and is readable or writable by group/others "
            f"(mode {mode & 0o777:03o}); chmod 600 it"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise EnvFileError(f"{path} is not valid UTF-8 (line {line})") from None
    try:
        return parse_env(text)
    except EnvFileError as exc:
        raise EnvFileError(f"{path}: {exc}") from None


def parse_env(text: str) -> dict[str, str]:
    """``NAME=value`` lines as a dict (a later line for a name wins, as in a shell)."""
    found: dict[str, str] = {}
    # Split on LF only: str.splitlines() also breaks at form feeds and Unicode separators,
    # which a password may hold (and a CR left in a value is refused as a line break later).
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r").strip()
        if not line or line.startswith("#"):
            continue
        name, value = _assignment(line, number)
        found[name] = value
    return found


def _assignment(line: str, number: int) -> tuple[str, str]:
    if line.startswith("export") and line[6:7] in (" ", "\t"):
        line = line[6:].lstrip()
    name, equals, value = line.partition("=")
    name, value = name.strip(), value.strip()
    if not equals or not _NAME_RE.fullmatch(name):
        raise EnvFileError(
            f"line {number} is not NAME=value (NAME: letters, digits and _, "
            "not starting with a digit)"
        )
    if value[:1] in _QUOTES:
        quote = value[0]
        if len(value) < 2 or value[-1] != quote:
            raise EnvFileError(f"line {number}: the value of {name} has no closing {quote}")
        value = value[1:-1]  # literally: no escapes, whatever lies between
    return name, value

"""A private Dovecot POP3 server on loopback for the tests: our config, our ports, our Maildirs."""

from __future__ import annotations

import base64
import fcntl
import functools
import itertools
import os
import pwd
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

MAIL_USER = "mailingest-test"
DEFAULT_UIDL_FORMAT = "%08Xu%08Xv"
START_TIMEOUT = 15.0
#: The issuer of the JWT access tokens an OAuth2-enabled fixture accepts.
OAUTH2_ISSUER = "mailingest-test-idp"
#: The HS256 key the session's Dovecot checks JWT access tokens with (tests mint them).
OAUTH2_KEY = b"mailingest-test-oauth2-hs256-key-0001"
STOP_TIMEOUT = 10.0
# SIGTERM usually ends it in milliseconds, but the master then waits 1-6 s for a child that was
# busy when the signal came. Everything here is disposable: SIGKILL after this grace.
TERM_GRACE = 0.5
# Dovecot's unix sockets live under root/run; sun_path holds 107 bytes, the longest name ~25.
_MAX_RUN_DIR_LEN = 80


class DovecotMissing(RuntimeError):
    """The `dovecot` binary is not installed. POP3 tests must fail on this, never skip."""


class PortTaken(RuntimeError):
    """Another process bound one of our ports between free_port() and Dovecot's listen()."""


#: Ports free_port hands out lie below this, outside the kernel's ephemeral range.
_PORTS_FROM = 10_000
_given: set[int] = set()


@functools.cache  # read once a process, not at every port
def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and is handed out once.

    It is picked below the ephemeral range (no outgoing connection takes it as its local
    port before the server binds it) and, when pytest-xdist runs the suite in several
    processes, from this process's own slice (no other worker picks it)."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    # One slice a worker, and one more for the workers xdist starts in place of a crashed
    # one (gw<count> and later share it).
    span = (_ephemeral_low() - _PORTS_FROM) // (max(count, 1) + 1)
    if span < 100:  # an unusual ephemeral range: the kernel's choice, as before
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    first = _PORTS_FROM + min(int(worker or 0), count) * span
    for _ in range(1000):  # bounded: a slice of a hundred ports or more has a free one
        port = random.randrange(first, first + span)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {first}-{first + span - 1} on 127.0.0.1")


def ensure_mail_user(name: str = MAIL_USER) -> pwd.struct_passwd:
    """The system user that owns the Maildirs: Dovecot refuses to serve mail as root."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # pytest-xdist workers may all find it missing at once. Two useradd at once are not
    # safe here (one run ended with the user made twice, its Maildirs owned by a uid that
    # was gone): one process at a time, and each looks again once it holds the lock.
    lock_path = Path(tempfile.gettempdir()) / f"{name}.useradd.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
        done = subprocess.run(
            ["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", name],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        try:
            return pwd.getpwnam(name)
        except KeyError:
            detail = done.stderr.strip()
            raise RuntimeError(f"could not create the system user {name!r}: {detail}") from None


def _unblocked_path(path: Path) -> Path | None:
    """The first directory on the way to `path` that others cannot traverse, if any."""
    for directory in reversed([path, *path.parents]):
        if not directory.stat().st_mode & 0o001:
            return directory
    return None


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is still in process group `pgid` (Linux /proc)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@contextmanager
def private_dovecot(
    *, keep_log_in: Path | None = None, oauth2_key: bytes | None = None
) -> Iterator[Dovecot]:
    """A started Dovecot in a fresh temp dir; on exit it is stopped and the dir removed.

    Not under pytest's tmp dirs: every pytest run resets pytest-of-<user> to 0700, which
    would lock the mail user out of its Maildirs mid-run. The log is copied to `keep_log_in`.
    """
    root = Path(tempfile.mkdtemp(prefix="mailingest-dovecot-"))
    try:
        root.chmod(0o711)  # traversable by the mail user, not listable
        for attempt in range(3):
            server = Dovecot(root, oauth2_key=oauth2_key)  # new free ports each time
            try:
                server.start()
                break
            except PortTaken:
                if attempt == 2:
                    raise
        try:
            yield server
        finally:
            server.stop()
    finally:
        log = root / "dovecot.log"
        if keep_log_in is not None and log.exists():
            shutil.copy2(log, keep_log_in / log.name)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Mailbox:
    """One user on a running Dovecot; `recent_user` is the Gmail-style login for the same mail."""

    user: str
    password: str
    dovecot: Dovecot = field(repr=False)

    @property
    def recent_user(self) -> str:
        return f"recent:{self.user}"

    def deliver(self, raw: bytes) -> None:
        self.dovecot.deliver(self.user, raw)

    def deliver_many(self, raws: Iterable[bytes]) -> None:
        self.dovecot.deliver_many(self.user, raws)

    def count(self) -> int:
        return self.dovecot.count(self.user)


class Dovecot:
    """Dovecot 2.3 run as `dovecot -F` in its own process group, with everything under `root`.

    Layout: dovecot.conf, dovecot.log (Dovecot's own log), dovecot.out (stdout/stderr),
    cert.pem/key.pem, run/ (base_dir), passwd.d/<user> (one passwd-file per user),
    mail/<user>/Maildir (owned by MAIL_USER).
    """

    host: str = "127.0.0.1"

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        ssl_port: int | None = None,
        uidl_format: str = DEFAULT_UIDL_FORMAT,
        binary: str = "dovecot",
        oauth2_key: bytes | None = None,
    ) -> None:
        found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
        if found is None:
            raise DovecotMissing(
                f"{binary!r} not found: the POP3 tests need a real Dovecot. "
                "Install dovecot-pop3d (apt-get install dovecot-pop3d); CI installs it."
            )
        self.binary = found
        self.root = root.resolve()
        self.port = port if port is not None else free_port()
        self.ssl_port = ssl_port if ssl_port is not None else free_port()
        while self.ssl_port == self.port:
            self.ssl_port = free_port()
        self.uidl_format = uidl_format
        #: HS256 key: OAuth2 sign-in (XOAUTH2, OAUTHBEARER) with JWTs Dovecot checks itself.
        self.oauth2_key = oauth2_key
        self.conf_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.out_path = self.root / "dovecot.out"
        self.cert_path = self.root / "cert.pem"
        self.key_path = self.root / "key.pem"
        self.run_dir = self.root / "run"
        self.passwd_dir = self.root / "passwd.d"
        self.mail_dir = self.root / "mail"
        self._proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._deliveries = itertools.count(1)
        self._mail_user: pwd.struct_passwd | None = None

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self._proc is not None else "stopped"
        return (
            f"<Dovecot {self.host}:{self.port} ssl={self.ssl_port} {state} "
            f"uidl={self.uidl_format!r} root={str(self.root)!r}>"
        )

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._prepare()
        self.conf_path.write_text(self._config())
        with self.out_path.open("ab") as out:
            # -F: stay in the foreground, so we hold its pid at once; a daemonized dovecot keeps
            # our inherited fds open. Own process group, so stop() reaches every child.
            self._proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        pgid = proc.pid  # process_group=0: the master leads its own group
        self._signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=TERM_GRACE)
        except subprocess.TimeoutExpired:
            self._signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
        # Children may outlive the master for a moment while holding the listening sockets;
        # a restart must not race them for the ports.
        deadline = time.monotonic() + STOP_TIMEOUT
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                self._signal_group(pgid, signal.SIGKILL)
                break
            time.sleep(0.01)
        # A killed master leaves its pid file; the next start must not meet a reused pid.
        (self.run_dir / "master.pid").unlink(missing_ok=True)

    def restart(self, *, uidl_format: str | None = None) -> None:
        """Stop and start on the same ports and mail, e.g. with new UIDLs (`"%v-%u"`)."""
        if uidl_format is not None:
            self.uidl_format = uidl_format
        self.stop()
        self.start()

    @staticmethod
    def _signal_group(pgid: int, signum: signal.Signals) -> None:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass

    def _wait_ready(self) -> None:
        """Until the plain port greets with +OK and the POP3S port accepts connections."""
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                diagnostics = self.diagnostics()
                error = PortTaken if "Address already in use" in diagnostics else RuntimeError
                raise error(f"dovecot exited with {self._proc.returncode} at start\n{diagnostics}")
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    greeting = sock.makefile("rb").readline()
                    if not greeting.startswith(b"+OK"):
                        raise RuntimeError(f"unexpected POP3 greeting {greeting!r}")
                    sock.sendall(b"QUIT\r\n")
                with socket.create_connection((self.host, self.ssl_port), timeout=2):
                    return
            except OSError as exc:
                last_error = repr(exc)
            time.sleep(0.05)
        raise RuntimeError(
            f"dovecot not ready within {START_TIMEOUT}s ({last_error})\n{self.diagnostics()}"
        )

    def diagnostics(self, lines: int = 30) -> str:
        """The tail of Dovecot's stdout and log, for error messages."""
        parts = []
        for path in (self.out_path, self.log_path):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def _prepare(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the Dovecot fixture runs as root (useradd, chown); CI does too")
        self._mail_user = ensure_mail_user()
        for directory in (self.root, self.run_dir, self.passwd_dir, self.mail_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if len(str(self.run_dir)) > _MAX_RUN_DIR_LEN:
            raise RuntimeError(f"{self.run_dir} is too long for Dovecot's unix sockets")
        self.passwd_dir.chmod(0o700)
        self.mail_dir.chmod(0o755)
        blocked = _unblocked_path(self.mail_dir)
        if blocked is not None:
            raise RuntimeError(
                f"{blocked} is not traversable by {MAIL_USER}: Dovecot cannot reach the "
                "Maildirs (see private_dovecot)"
            )
        if not self.cert_path.exists():
            self._make_cert()
        if self.oauth2_key is not None:
            # Local validation: the key of JWTs without azp and kid, base64, in a dict file.
            key_file = self.root / "oauth2-keys" / "default" / "HS256" / "default"
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(base64.b64encode(self.oauth2_key).decode())
            (self.root / "oauth2.conf.ext").write_text(
                "introspection_mode = local\n"
                f"local_validation_key_dict = fs:posix:prefix={self.root}/oauth2-keys/\n"
                "username_attribute = email\n"
                f"issuers = {OAUTH2_ISSUER}\n"
            )

    def _make_cert(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("the `openssl` CLI is needed for the Dovecot test certificate")
        subprocess.run(
            [
                openssl, "req", "-x509", "-nodes", "-days", "30",
                "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-keyout", str(self.key_path), "-out", str(self.cert_path),
                "-subj", "/CN=localhost",
                "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )  # fmt: skip

    def _config(self) -> str:
        assert self._mail_user is not None
        uid, gid = self._mail_user.pw_uid, self._mail_user.pw_gid
        return f"""\
# Written by tests/dovecot.py; regenerated at every start.
base_dir = {self.run_dir}
state_dir = {self.run_dir}
protocols = pop3
listen = {self.host}
log_path = {self.log_path}
# Microseconds: the fleet test tells sessions of one user apart in time.
log_timestamp = "%Y-%m-%d %H:%M:%S.%{{usecs}} "
default_login_user = nobody
default_internal_user = root
default_internal_group = root
# A 60 MB message must not hit the address-space limit.
default_vsz_limit = 0
login_trusted_networks = 127.0.0.0/8
disable_plaintext_auth = no
auth_mechanisms = plain login{" xoauth2 oauthbearer" if self.oauth2_key else ""}
auth_verbose = yes
auth_failure_delay = 0
# Gmail-style "recent:u1" logs in as "recent_u1", whose mail dir links to u1's.
auth_username_chars = abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@:
auth_username_translation = :_
ssl = yes
ssl_cert = <{self.cert_path}
ssl_key = <{self.key_path}
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
first_valid_gid = {gid}
# Parallel test logins to one mailbox must not be refused (default 10).
mail_max_userip_connections = 100
pop3_uidl_format = {self.uidl_format}
# One file per user: a new user is a new file, never a stale cache of a file read this second.
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}
{self._oauth2_passdb()}userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.mail_dir}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener pop3s {{
    address = {self.host}
    port = {self.ssl_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
  # No auth penalty: after failed logins it delays every login from the IP, good ones too.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  chroot =
}}
"""

    def _oauth2_passdb(self) -> str:
        if self.oauth2_key is None:
            return ""
        return (
            "passdb {\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n"
            f"  args = {self.root}/oauth2.conf.ext\n}}\n"
        )

    # -- users and mail ----------------------------------------------------------------------

    def new_mailbox(self) -> Mailbox:
        """A fresh user `u<n>` with password `pw-u<n>-Zq9!`."""
        name = f"u{next(self._names)}"
        while (self.mail_dir / name).exists():  # e.g. a user made by hand in this root
            name = f"u{next(self._names)}"
        password = f"pw-{name}-Zq9!"
        self.add_user(name, password)
        return Mailbox(name, password, self)

    def add_user(self, name: str, password: str) -> Path:
        """Create `name` and `recent_<name>` (same password, same mail); returns the Maildir."""
        _check_name(name)
        _check_password(password)
        uid, gid = self._owner()
        maildir = self.maildir(name)
        for directory in (maildir.parent, maildir, *(maildir / sub for sub in _SUBDIRS)):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chown(directory, uid, gid)
        recent = self.mail_dir / f"recent_{name}"
        if not recent.is_symlink():
            recent.symlink_to(name)  # relative: the root stays movable
        self._write_passwd(name, password)
        self._write_passwd(f"recent_{name}", password)
        return maildir

    def set_password(self, name: str, password: str) -> None:
        """Change the password of `name` (and `recent_<name>`); Dovecot sees it on return.

        passwd-file rereads a file when its mtime (whole seconds) or size changed, but stats
        it at most once per second: a lookup in the same second as ours may reuse the old
        one. So bump the mtime and return only once the clock has reached the next second.
        """
        _check_password(password)
        if not (self.passwd_dir / name).exists():
            raise KeyError(f"no such user {name!r}")
        self._write_passwd(name, password)
        self._write_passwd(f"recent_{name}", password)
        written = time.time()
        time.sleep(int(written) + 1.05 - written)

    def _write_passwd(self, name: str, password: str) -> None:
        path = self.passwd_dir / name
        tmp = self.passwd_dir / f".{name}.tmp"
        tmp.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        old_mtime = path.stat().st_mtime if path.exists() else 0.0
        mtime = max(time.time(), int(old_mtime) + 1.0)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)  # atomic: a lookup sees the old file or the new one

    def maildir(self, user: str) -> Path:
        return self.mail_dir / user / "Maildir"

    def deliver(self, user: str, raw: bytes) -> None:
        """Put `raw` byte for byte into the user's Maildir/new, like an MDA (tmp/, then rename)."""
        maildir = self.maildir(user)
        if not (maildir / "new").is_dir():
            raise KeyError(f"no such user {user!r}")
        uid, gid = self._owner()
        name = f"{time.time_ns()}.M{next(self._deliveries)}P{os.getpid()}.mailingest-test"
        tmp = maildir / "tmp" / name
        with tmp.open("wb") as handle:
            handle.write(raw)
            os.fchown(handle.fileno(), uid, gid)
        os.rename(tmp, maildir / "new" / name)

    def deliver_many(self, user: str, raws: Iterable[bytes]) -> None:
        for raw in raws:
            self.deliver(user, raw)

    def count(self, user: str) -> int:
        """Messages in the mailbox now (new + cur), expunged ones excluded."""
        maildir = self.maildir(user)
        # By base name: Dovecot renames new/X to cur/X:2,<flags> while we list.
        names: set[str] = set()
        for sub in ("new", "cur"):
            names.update(
                entry.name.split(":", 1)[0]
                for entry in os.scandir(maildir / sub)
                if not entry.name.startswith(".")
            )
        return len(names)

    def password_mismatches(self, user: str | None = None, *, settle: float = 1.0) -> int:
        """Rejected logins in the log ("Password mismatch" and "unknown user"), for `user` or all.

        Dovecot writes the line a moment after the client got its reply: this polls for
        `settle` seconds and returns the count at the end. `recent:u1` is counted as
        `recent_u1`, the name Dovecot looks up.
        """
        deadline = time.monotonic() + settle
        count = self._count_mismatches(user)
        while time.monotonic() < deadline:
            time.sleep(0.05)
            count = self._count_mismatches(user)
        return count

    def sessions(self) -> list[Session]:
        """Every POP3 session that logged in, with when it began and ended (log order)."""
        begun: dict[str, Session] = {}
        if not self.log_path.exists():
            return []
        with self.log_path.open(errors="replace") as log:
            for line in log:
                if found := _LOGIN.match(line):
                    when, user, session = found.groups()
                    begun[session] = Session(user, session, _log_time(when))
                elif (found := _END.match(line)) and found.group(3) in begun:
                    when, _, session, how = found.groups()
                    ended = begun[session]
                    ended.ended, ended.logged_out = _log_time(when), how.startswith("Logged out")
        return list(begun.values())

    def _count_mismatches(self, user: str | None) -> int:
        if not self.log_path.exists():
            return 0
        # With auth_verbose: "auth: Info: passwd-file(u1,127.0.0.1,<id>): Password mismatch"
        # (or "unknown user"), and for a name without a passwd file (we keep one per user)
        # "auth: Info: missing passwd file: <passwd_dir>/<name>".
        name = None if user is None else user.replace(":", "_")
        missing = f"missing passwd file: {self.passwd_dir}/"
        count = 0
        with self.log_path.open(errors="replace") as log:
            for line in log:
                if "Password mismatch" in line or "unknown user" in line:
                    counted = name is None or f"({name}," in line
                elif missing in line:
                    counted = name is None or line.rstrip().endswith(missing + name)
                else:
                    counted = False
                count += counted
        return count

    def _owner(self) -> tuple[int, int]:
        if self._mail_user is None:
            self._mail_user = ensure_mail_user()
        return self._mail_user.pw_uid, self._mail_user.pw_gid


_SUBDIRS = ("new", "cur", "tmp")
# Dovecot's auth_username_chars without the ':' that only the "recent:" prefix may use.
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + ".-_@")


@dataclass
class Session:
    user: str
    id: str
    began: float
    ended: float | None = None
    logged_out: bool = False  # ended with QUIT (not dropped, not killed)


_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}) "
_LOGIN = re.compile(_STAMP + r"pop3-login: Info: Login: user=<([^>]*)>.*session=<([^>]*)>")
_END = re.compile(_STAMP + r"pop3\(([^)]*)\)<\d+><([^>]*)>: Info: Disconnected: (.*)")


def _log_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _check_name(name: str) -> None:
    # A name is also a passwd-file key, a file name and a directory name.
    if not name or name.startswith(".") or not set(name) <= _NAME_CHARS:
        raise ValueError(f"user name {name!r}: use letters, digits and .-_@ (no leading dot)")


def _check_password(password: str) -> None:
    # passwd-file is colon-separated, one user per line.
    if not password or set(password) & set(":\n\r\0"):
        raise ValueError("a passwd-file password cannot be empty or hold ':', CR, LF or NUL")

"""Run one program and measure its wall time and its own peak RSS (Linux).

Peak RSS is read from ``/proc/<pid>/status`` (``VmHWM``) at the instant the process exits,
while its memory still exists: the child is traced (ptrace) only to be stopped at its exit
event. ``ru_maxrss`` from ``wait4`` is not used as the answer because on Linux a child's
``ru_maxrss`` also counts the memory it had *before* ``exec``, that is a copy of the
parent (here the bench driver, a Python process of its own size): a 5 MB program started
from a 200 MB parent reports 200 MB. ``VmHWM`` belongs to the address space that ``exec``
created, so it counts the measured program alone. Its children (an MDA, a shell) are not
counted; none of the measured tools keeps messages in a child.

When ptrace is not allowed (some containers), the fallback is ``ru_maxrss`` and the result
is marked as an upper bound.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PTRACE_TRACEME = 0
_PTRACE_CONT = 7
_PTRACE_SETOPTIONS = 0x4200
_PTRACE_O_TRACEEXEC = 0x10
_PTRACE_O_TRACEEXIT = 0x40
_PTRACE_O_EXITKILL = 0x100000
_PTRACE_EVENT_EXEC = 4
_PTRACE_EVENT_EXIT = 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


@dataclass(frozen=True)
class Measured:
    """One finished run."""

    argv: tuple[str, ...]
    exit_code: int
    wall_s: float
    cpu_s: float  # user + system, its reaped children (an MDA per message...) included
    peak_rss_kb: int
    exact_rss: bool  # False: ru_maxrss fallback, an upper bound
    stdout: Path
    stderr: Path

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_kb / 1024


def _ptrace(request: int, pid: int, data: int = 0) -> int:
    return int(_libc.ptrace(request, pid, None, ctypes.c_void_p(data)))


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_measured(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800.0,
    stdin: Path | None = None,
) -> Measured:
    """Run ``argv`` to completion; stdout/stderr go to files in ``cwd``."""
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    environ = dict(os.environ if env is None else env)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work, then exec
        try:
            os.chdir(cwd)
            fd_in = os.open(stdin if stdin is not None else os.devnull, os.O_RDONLY)
            fd_out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fd_err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd_in, 0)
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            os.setpgid(0, 0)  # own process group: a timeout kills its children too
            _libc.ptrace(_PTRACE_TRACEME, 0, None, None)  # failure: runs untraced
            os.execvpe(argv[0], list(argv), environ)
        finally:
            os._exit(127)
    return _supervise(pid, tuple(argv), started, timeout, out_path, err_path)


def _supervise(
    pid: int, argv: tuple[str, ...], started: float, timeout: float, out: Path, err: Path
) -> Measured:
    traced = False
    hwm: int | None = None
    watchdog = threading.Timer(timeout, _kill_group, (pid,))
    watchdog.daemon = True
    watchdog.start()
    try:
        while True:
            _, status, usage = os.wait4(pid, 0)  # traced: stops are reported too
            if not os.WIFSTOPPED(status):
                break
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGTRAP and not traced:
                # The stop after the traced exec: from now on stop at its exit, and report
                # a later exec (a wrapper script exec-ing the real program) as an event.
                traced = True
                options = _PTRACE_O_TRACEEXIT | _PTRACE_O_TRACEEXEC | _PTRACE_O_EXITKILL
                _ptrace(_PTRACE_SETOPTIONS, pid, options)
                _ptrace(_PTRACE_CONT, pid)
            elif sig == signal.SIGTRAP and status >> 16 == _PTRACE_EVENT_EXIT:
                hwm = _vm_hwm_kb(pid)  # exiting, its memory not yet released
                _ptrace(_PTRACE_CONT, pid)
            elif sig == signal.SIGTRAP and status >> 16 == _PTRACE_EVENT_EXEC:
                _ptrace(_PTRACE_CONT, pid)
            else:
                _ptrace(_PTRACE_CONT, pid, sig)  # pass the signal on (SIGCHLD, SIGPIPE...)
    finally:
        watchdog.cancel()
    wall = time.monotonic() - started
    return Measured(
        argv=argv,
        exit_code=os.waitstatus_to_exitcode(status),
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_kb=hwm if hwm is not None else usage.ru_maxrss,
        exact_rss=hwm is not None,
        stdout=out,
        stderr=err,
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass

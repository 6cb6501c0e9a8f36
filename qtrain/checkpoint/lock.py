"""One run per output_dir: a lock file that a second run finds held, naming its holder.

Two runs on one output_dir (a double submit, a requeue while the old job still runs) would both
train to the end, interleave metrics.jsonl and race on checkpoints. The first run holds a POSIX
record lock (`fcntl.lockf`, which NFS supports too) on `<output_dir>/.qtrain.lock` for its whole
life; the kernel (or the NFS lock manager) drops it when the process exits, however it exits, so a
dead holder never blocks the next run. The file records who holds it (pid, host, start time,
command) for the error message; it is left in place on release (removing it would race with a
run that opened it a moment before).

Where the filesystem refuses record locks (ENOLCK and friends), the lock falls back to the
recorded pid and host: a lock file from a pid that no longer runs on this host is stale and taken
over; one from another host is honoured, and the message says how to clear it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from qtrain.errors import ConfigError

LOCK_NAME = ".qtrain.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')}, started {when} ({info.get('command', '?')})"


def _record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                       "command": " ".join(sys.argv)[:300]}) + "\n"


def _busy(out: Path, path: Path) -> ConfigError:
    return ConfigError(f"output_dir: {out} is in use by another qtrain run: {_holder_text(path)}; wait for it to "
                       f"finish or stop it, or choose another output_dir (if that run is surely gone, delete {path})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Held from `acquire()` until `release()` (or process exit)."""

    def __init__(self, out: Path) -> None:
        self.out, self.path = Path(out), Path(out) / LOCK_NAME
        self._fd: int | None = None
        self._by_record = False

    def acquire(self) -> RunLock:
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise _busy(self.out, self.path) from None
            if exc.errno not in _UNSUPPORTED:
                raise
            return self._acquire_by_record()
        os.ftruncate(fd, 0)
        os.write(fd, _record().encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_by_record(self) -> RunLock:
        """No record locks here: the pid/host in the file decide whether its holder is alive."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        pid = info.get("pid")
        if pid and pid != os.getpid():
            stale = info.get("host") == socket.gethostname() and not _pid_alive(int(pid))
            if not stale:
                raise _busy(self.out, self.path)
        self.path.write_text(_record())
        self._by_record = True
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._by_record:
            self.path.write_text("")  # no record: the next run, from any host, may take it
            self._by_record = False

"""An exclusive lock on a file, held by one process at a time, released by the kernel at its death.

`FileLock(path)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `path` and writes its holder (host,
pid, start time, command) into the file; a second process is refused with one line naming that
holder. The lock belongs to the open file, so a holder that exits in any way (SIGKILL and power
loss included) releases it: on a local disk a lock is never stale, and the text left in the file
by a dead holder means nothing. `holder(path)` tells whether the lock is held, and by whom,
without taking it (for a status board).

The file is written in place, never replaced by rename: a rename would put a new, unlocked file
under the name while the holder keeps its lock on the old one (a holder that removes the file on
purpose, `remove_file`, is why a taker checks after locking that the path still names
its file, and locks again if not). A forked child (a DataLoader worker) closes its copy of the
descriptor at once: the lock belongs to the open file, and a worker that outlives a killed holder by
a few seconds would otherwise keep it held.

Network file systems: on Linux, flock on NFS (v3 with lockd, v4) is a lock held by the server,
so it excludes processes on every client; when a client dies, the server frees its locks after
its lease (NFSv4, 90 s by default) or when the client's lock manager restarts (v3). Mounted with
`local_lock=flock` or `nolock`, NFS locks are local to each client and exclude nothing between
machines. Lustre without `-o flock` and some FUSE file systems refuse flock: the lock is then
skipped with a warning.
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
from typing import Any

from common.errors import UserError, warn

# A status board holds a shared lock for a moment to test the lock: a taker retries that long.
RETRY_S, RETRY_EVERY_S = 1.0, 0.05
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # Closing (not unlocking: that would release the parent's lock too) drops the child's copy.
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def holder_info() -> dict[str, Any]:
    """Who this process is: what a refused process and a status board show."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
    except ValueError:  # a holder between truncating and writing its name
        return {}
    return info if isinstance(info, dict) else {}


class FileLock:
    """`with FileLock(path, what):` holds the lock for the block; `what` names the resource."""

    def __init__(self, path: str | os.PathLike, what: str, fix: str):
        self.path, self.what, self.fix = Path(path), what, fix
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                if not self.path.parent.is_dir():  # removed between mkdir and open: again
                    continue
                raise UserError(
                    f"cannot create the lock {self.path} (a dangling link?); remove it"
                ) from None
            try:
                if not self._lock(fd):
                    os.close(fd)
                    return self
            except BaseException:
                os.close(fd)
                raise
            if self._still_named(fd):
                break
            # Locked a file that its holder removed meanwhile (`remove_file`): it
            # excludes no one now; lock the file that the path names.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        _HELD.add(fd)
        return self

    def _lock(self, fd: int) -> bool:
        """Take the lock (True), or find the file system without locks (False), or refuse."""
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"{self.what} is in use by {describe(_read_info(fd))} (lock {self.path}); "
                        f"{self.fix}"
                    ) from None
                time.sleep(RETRY_EVERY_S)
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    raise
                warn(
                    f"cannot lock {self.path} ({err.strerror}): this file system offers no "
                    f"locks; make sure that no other process uses {self.what}"
                )
                return False

    def _still_named(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def remove_folder_if_only_lock(self) -> None:
        """While held: remove the lock file and its folder when the folder holds nothing else
        (a run refused before it wrote anything)."""
        try:
            alone = [p.name for p in self.path.parent.iterdir()] == [self.path.name]
        except FileNotFoundError:
            return
        if alone:
            self.remove_file(folder_too=True)

    def remove_file(self, folder_too: bool = False) -> None:
        """While held: remove the lock file, and with `folder_too` its folder if now empty. A
        taker waiting on the removed file, or one that makes the folder again meanwhile, locks
        the file the path names afterwards."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        if not folder_too:
            return
        try:
            self.path.parent.rmdir()
        except OSError as err:  # not empty (a new taker's lock file, say): the folder stays
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.ftruncate(self.fd, 0)  # while still locked: a new holder's name is never wiped
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None


def holder(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder's info (host, pid, started, command) if the lock is held, else None.

    Tests the lock with a shared lock taken and released at once; a process taking the lock at
    that moment retries for RETRY_S, so the test never refuses a trainer.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

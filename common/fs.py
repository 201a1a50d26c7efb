"""Atomic writes: a reader sees either the old file or the complete new one, never a part.

Every artifact of the pipeline (images, manifests, configs, checkpoints, logits, submissions)
is written to a temporary name in the same folder and renamed into place, so that a process
killed mid-write leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.errors import UserError


def _umask() -> int:
    """The process's umask (os.umask reads it only by setting it: done once, at import)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What open() would give a new file: mkstemp's 0600 kept every dataset, checkpoint and
# submission from a group's other members on a shared cluster.
FILE_MODE = 0o666 & ~_umask()


def require_writable(path: str | os.PathLike, fix: str) -> None:
    """Refuse now, before the work whose results go to the folder `path` (made later, if it
    does not exist), a place where nothing can be written: found at the end, it loses the work
    (make logits: hours of TenCrop)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: {existing} is a file, not a folder; {fix}")
    try:  # tried, not os.access: root passes that check where the file system refuses
        os.rmdir(tempfile.mkdtemp(prefix=".writable-", dir=existing))
    except OSError as err:
        raise UserError(f"{path}: cannot write in {existing} ({err.strerror}); {fix}") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        # fsync before rename: after a power loss the rename must not point at empty blocks.
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))

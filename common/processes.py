"""Process trees from /proc: torchrun starts each training process in a session of its own, so a
signal to a process group does not reach it; the launcher and the smoke run walk the tree."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def _stat_fields(stat: Path) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def _children_of() -> dict[int, list[int]]:
    """Each running process's parent -> its children."""
    found: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(_stat_fields(stat)[1])
        except (OSError, IndexError, ValueError):
            continue
        found.setdefault(ppid, []).append(int(stat.parent.name))
    return found


def children(pid: int) -> list[int]:
    """The processes `pid` started (its direct children)."""
    return _children_of().get(pid, [])


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents before their children."""
    found = _children_of()
    tree, todo = [pid], [pid]
    while todo:
        kids = found.get(todo.pop(), [])
        tree += kids
        todo += kids
    return tree


def command_line(pid: int) -> list[str]:
    """`pid`'s argv ([] once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def catches(pid: int, sig: int) -> bool:
    """Whether `pid` has a handler of its own for `sig` (SigCgt in /proc/<pid>/status)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    masks = [line.split()[1] for line in lines if line.startswith("SigCgt:")]
    return bool(masks) and bool(int(masks[0], 16) >> (sig - 1) & 1)


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan nobody has reaped yet)."""
    try:
        return _stat_fields(Path(f"/proc/{pid}/stat"))[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant (found before the first is killed, so that no orphan
    escapes by being re-parented): a child past its time, with whatever it started."""
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)

"""Process trees from /proc: torchrun starts each training process in a session of its own, so a
signal to a process group does not reach it; the launcher and the smoke run walk the tree. And
the CPUs a process may use, which its launcher and its loader share out."""

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


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` (SIGKILL) to `pid` and every descendant (found before the first is signalled,
    so that no orphan escapes by being re-parented): a child past its time, with what it started."""
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, sig)


# cgroup v2's limit as a container sees it (under its cgroup namespace), then cgroup v1's.
CPU_QUOTA_FILES = (
    (Path("/sys/fs/cgroup/cpu.max"),),
    (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
)


def cpu_quota() -> int | None:
    """The CPUs a cgroup's CFS quota grants (`docker --cpus`, a Kubernetes CPU limit), rounded
    down; None without one. The affinity mask still lists every core of the host there: a
    16-CPU container on a 128-core node would otherwise start 127 loader workers per GPU."""
    for files in CPU_QUOTA_FILES:
        try:
            words = " ".join(path.read_text() for path in files).split()
        except OSError:
            continue
        if len(words) == 2 and words[0].isdigit() and words[1].isdigit() and int(words[1]):
            return max(1, int(words[0]) // int(words[1]))
        return None  # "max" (v2) or -1 (v1): no quota
    return None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask (taskset, SLURM), within its cgroup's
    CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota()
    return cpus if quota is None else min(cpus, quota)

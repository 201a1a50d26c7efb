"""A run's heartbeat file: which process trains it, how far it is, and how it ended.

The training loop rewrites `runs/<name>/heartbeat.json` (state, step, host, pid, start and update
times) at every logged interval and epoch end, and once more with the final state: done, stopped
(preempted with a checkpoint) or failed. `activity` turns it into one word for `make status`,
reading the file and the run's lock (`train.lock`, which the kernel holds exactly while its
trainer lives: a pid reused by another process, or a requeued run not yet beating, cannot fool
it): it is the one place that decides whether a run is alive.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from common.fs import write_text_atomic
from common.lock import holder

FILE = "heartbeat.json"
LOCK = "train.lock"  # held by the main process for the whole run (train/run.py)
# A run on another host counts as running while its heartbeat is younger than this: long enough
# for an epoch-end evaluation of the largest model between two beats.
SILENT_AFTER_S = 1800


def write(run_dir: Path, state: str, step: int, started: float) -> None:
    beat = {
        "state": state,
        "step": step,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started,
        "updated": time.time(),
    }
    write_text_atomic(Path(run_dir) / FILE, json.dumps(beat) + "\n")


# What `write` puts in a beat; a file without them (cut short, edited, another version's) is
# read as no beat rather than failing `make status`.
TIME = (int, float)
FIELDS = {"state": str, "step": int, "host": str, "pid": int, "started": TIME, "updated": TIME}


def read(run_dir: Path) -> dict[str, Any] | None:
    try:
        beat = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(beat, dict):
        return None
    fits = all(isinstance(beat.get(key), kind) for key, kind in FIELDS.items())
    return beat if fits and beat["pid"] > 0 else None  # kill(0, ...) would probe our own group


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def locked(run_dir: Path) -> bool | None:
    """Whether a trainer holds the run's lock (None: no lock file, or a file system that
    cannot tell)."""
    path = Path(run_dir) / LOCK
    try:
        return holder(path) is not None if path.is_file() else None
    except OSError:
        return None


def activity(run_dir: Path, now: float | None = None) -> str:
    """running, done, stopped, failed, killed (its process is gone), silent (no beat for
    SILENT_AFTER_S on another host), or - (never started)."""
    held = locked(run_dir)
    if held:
        return "running"  # also a run that has not written its first beat yet
    beat = read(run_dir)
    if beat is None:
        return "-"
    if beat["state"] != "running":
        return beat["state"]
    if beat["host"] == socket.gethostname():
        alive = held is None and _alive(beat["pid"])  # an unheld lock: its trainer is gone
        return "running" if alive else "killed"
    silent = (now or time.time()) - beat["updated"] > SILENT_AFTER_S
    return "silent" if silent else "running"

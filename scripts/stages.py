"""The pipeline's stages as subprocesses, shared by every room of `scripts/`.

The demo, the study runner, the smoke run and the benchmarks start the real commands
(`python -m train.launch`, `python -m ensemble.logits`, ...) from the repository root with it on
PYTHONPATH, exactly as a user's `make` target does; `logits_current` tells them whether a model's
TenCrop logits can be reused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.processes import kill_tree
from train.checkpoint import MARKER, checkpoint_root
from train.config import logits_dir, run_dir

ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH (for `python -m
    <stage>`), ahead of what was there (packages installed with --target, as on a machine
    without the project's environment)."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_child(
    command: list[str], timeout: float | None = None, **popen: Any
) -> subprocess.CompletedProcess:
    """`command` run to its end, or past `timeout` seconds (or on Ctrl-C) ended with everything it
    started (`subprocess.TimeoutExpired`): `subprocess.run` would kill the child alone and leave
    its own children (the training processes of `train.launch`) holding the GPU."""
    with subprocess.Popen(command, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            kill_tree(proc.pid)
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_module(
    *args: str,
    then: str = "rerun",
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """`python -m <args>` (paths relative to the caller's folder, as in the caller's own
    arguments), with `env` on top of the child environment, ended with its children after
    `timeout` seconds (`subprocess.TimeoutExpired`); a failure is one line that says what to do."""
    proc = run_child([sys.executable, "-m", *args], timeout, env={**child_env(), **(env or {})})
    if proc.returncode != 0:
        command = " ".join(args)
        raise UserError(f"`python -m {command}` failed ({proc.returncode}); fix it and {then}")


def logits_current(cfg: dict) -> bool:
    """True when the model's logits are complete and newer than its best checkpoint."""
    meta = logits_dir(cfg) / "meta.json"
    best = checkpoint_root(run_dir(cfg)) / "best" / MARKER
    return meta.is_file() and best.is_file() and meta.stat().st_mtime > best.stat().st_mtime

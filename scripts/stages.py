"""The pipeline's stages as subprocesses, shared by every room of `scripts/`.

The demo, the study runner, the smoke run and the benchmarks start the real commands
(`python -m train.launch`, `python -m ensemble.logits`, ...) from the repository root with it on
PYTHONPATH, exactly as a user's `make` target does; `logits_current` tells them whether a model's
TenCrop logits can be reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.processes import kill_tree
from ensemble.members import checkpoint_state
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


def logits_current(cfg: dict, view: str = "tencrop", role: str = "teacher") -> bool:
    """True when the model's logits are complete, made from its best checkpoint as it is now
    (`checkpoint_state`), and read as asked: `view`, `role`, the config's test size, resize and
    fusion weight (a centre-crop `make logits` in the same folder is not the demo's TenCrop)."""
    # Here, not at the top: the light scripts that import this module for ROOT and child_env
    # (chaos, smoke, benchmarks) would start timm and torchvision for it (2 s).
    from train.inference import resize_size

    meta_path = logits_dir(cfg) / "meta.json"
    if not (meta_path.is_file() and (checkpoint_root(run_dir(cfg)) / "best" / MARKER).is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    asked = {
        "checkpoint": "best",
        "role": role,
        "view": view,
        "test_size": cfg["test_size"],
        "resize_size": resize_size(cfg),
    }
    if cfg["fusion_weight"] is not None:  # null: chosen on held-out images by the logits run
        asked["fusion_weight"] = cfg["fusion_weight"]
    if any(meta.get(key) != value for key, value in asked.items()):
        return False
    return checkpoint_state(meta, meta_path, run_dir(cfg)) == "fresh"

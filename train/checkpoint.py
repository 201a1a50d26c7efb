"""Checkpoints that survive kills: atomic folders, a completeness marker, verified on resume.

A checkpoint is a folder `runs/<name>/checkpoints/step_<N>/` holding `student.safetensors`,
`teacher.safetensors`, `state.pt` (optimiser, scheduler, scaler, loop position, metrics history,
config) and `rng_rank<r>.pt` (every process's RNG states). It is assembled under a `.tmp` name;
the main process writes `COMPLETE` (a sha256 of every file) and renames the folder into place,
so a folder without a valid marker is never trusted. Retention deletes old folders only after
the new one is in place. `best/` is a copy of the best epoch-end checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.fs import atomic_path, write_text_atomic

MARKER = "COMPLETE"
WEIGHTS = ("student", "teacher")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_tensor_file(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file({k: v.detach().contiguous().cpu() for k, v in obj.items()}, str(tmp))
        else:
            torch.save(obj, tmp)


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int,
) -> Path | None:
    """Write checkpoint `step` from every process; return its folder on the main process."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_tensor_file(tmp / f"rng_rank{accelerator.process_index}.pt", rng_state())
    if accelerator.is_main_process:
        for role in WEIGHTS:
            _save_tensor_file(tmp / f"{role}.safetensors", weights[role])
        _save_tensor_file(tmp / "state.pt", state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        meta = {"step": step, "world_size": accelerator.num_processes, "files": files}
        write_text_atomic(tmp / MARKER, json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _retain(root, keep_last)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def _retain(root: Path, keep_last: int) -> None:
    complete = [p for p in _step_dirs(root) if (p / MARKER).is_file()]
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old)


def _step_dirs(root: Path) -> list[Path]:
    """Finished step folders, oldest first (unfinished `.tmp` folders are not listed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def mark_best(run_dir: Path, step_dir: Path) -> None:
    """Make `checkpoints/best` a copy of `step_dir` (hard links: no extra disk), atomically."""
    root = checkpoint_root(run_dir)
    tmp = root / "best.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(step_dir, tmp, copy_function=_link_or_copy)
    old = root / "best.old"
    shutil.rmtree(old, ignore_errors=True)
    if (root / "best").exists():
        (root / "best").rename(old)
    tmp.rename(root / "best")
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


def verify(step_dir: Path) -> bool:
    """True when the marker exists and every file it lists is present with its checksum."""
    marker = step_dir / MARKER
    try:
        files = json.loads(marker.read_text())["files"]
        return all(_sha256(step_dir / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError):
        return False


def latest_valid(run_dir: Path) -> Path | None:
    """The newest verified checkpoint; a damaged newer one is skipped with a warning."""
    for step_dir in reversed(_step_dirs(checkpoint_root(run_dir))):
        if verify(step_dir):
            return step_dir
        warnings.warn(
            f"{step_dir} is incomplete or corrupt; resuming from an older checkpoint", stacklevel=2
        )
    return None


def load_state(step_dir: Path, rank: int) -> tuple[dict, dict, dict]:
    """(weights by role, loop state, this rank's RNG state) of a verified checkpoint."""
    weights = {role: load_file(str(step_dir / f"{role}.safetensors")) for role in WEIGHTS}
    state = torch.load(step_dir / "state.pt", weights_only=True)
    rng_file = step_dir / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return weights, state, rng


def load_weights(run_dir: Path, which: str = "best", role: str = "teacher") -> dict:
    """Weights of one role from a run's `best`, `last` (newest valid) or a checkpoint folder."""
    name = weights_name(role)
    return load_file(str(resolve_checkpoint(run_dir, which) / name))


def weights_name(role: str) -> str:
    if role not in WEIGHTS:
        raise UserError(f"role {role!r} is not one of {', '.join(WEIGHTS)}")
    return f"{role}.safetensors"


def file_digest(step_dir: Path, name: str) -> str | None:
    """The sha256 of a checkpoint file as its marker records it (verify() has checked it)."""
    try:
        return json.loads((Path(step_dir) / MARKER).read_text())["files"].get(name)
    except (OSError, ValueError, KeyError):
        return None


def resolve_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """The verified folder of a run's `best`, `last` (newest valid) or a checkpoint folder."""
    if which == "last":
        step_dir = latest_valid(run_dir)
    elif which == "best":
        step_dir = checkpoint_root(run_dir) / "best"
    else:
        step_dir = Path(which)
    if step_dir is None or not verify(step_dir):
        raise UserError(
            f"no complete {which!r} checkpoint in {run_dir}: train it first "
            f"(make train MODEL={Path(run_dir).name}) or pass --checkpoint last|PATH"
        )
    return step_dir

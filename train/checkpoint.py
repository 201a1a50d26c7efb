"""Checkpoints that survive kills: atomic folders, a completeness marker, verified on resume.

A checkpoint is a folder `runs/<name>/checkpoints/step_<N>/` holding `student.safetensors`,
`teacher.safetensors`, `state.pt` (optimiser, scheduler, scaler, loop position, metrics history,
config) and `rng_rank<r>.pt` (every process's RNG states). It is assembled under a `.tmp` name;
the main process writes `COMPLETE` (a sha256 of every file) and renames the folder into place,
so a folder without a valid marker is never trusted. Retention deletes old folders only after
the new one is in place, and never the newest one nor the one `best/` (a copy of the best
epoch-end checkpoint) was made from. A disk that fills up during a write removes the partial
folder and stops the run with one line saying how much room a checkpoint needs.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from common.errors import UserError
from common.fs import write_bytes_atomic, write_text_atomic
from train.rng import rng_state

MARKER = "COMPLETE"
WEIGHTS = ("student", "teacher")
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_tensor_file(path: Path, obj: Any) -> None:
    """Serialised in memory, written by Python: a full disk is then an OSError (ENOSPC) here,
    where safetensors and torch.save would each report it as an error type of their own."""
    if path.suffix == ".safetensors":
        data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in obj.items()})
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
    write_bytes_atomic(path, data)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples: what a checkpoint weighs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _progress(state: dict[str, Any]) -> dict[str, Any]:
    """Where the run stood, for readers of the marker (`make logits`) that need no state.pt."""
    if "position" not in state:
        return {}
    epoch, micro, _ = state["position"]
    return {"epoch": epoch, "mid_epoch": micro > 0, "epochs": state["config"]["epochs"]}


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int,
) -> Path | None:
    """Write checkpoint `step` from every process; return its folder on the main process.
    A failure on any process (a full disk, another node's files missing) is every process's:
    one raising alone would leave the others waiting in the next collective for the launcher's
    timeout, and one removing the folder would pull it from under the others' writes."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:09d}"
    tmp = root / f"step_{step:09d}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    need = (tensor_bytes(weights) + tensor_bytes(state)) / 1e6

    def seal() -> None:
        files = {name: _sha256(tmp / name) for name in _sealed(tmp, accelerator.num_processes)}
        meta = {"step": step, "world_size": accelerator.num_processes, "files": files}
        write_text_atomic(tmp / MARKER, json.dumps({**meta, **_progress(state)}, indent=1))

    written = _failure(lambda: _write_files(accelerator, tmp, weights, state), root, step, need)
    failure = _first_failure(accelerator, written)
    if failure is None and accelerator.is_main_process:
        failure = _failure(seal, root, step, need)
    failure = _first_failure(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(failure)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _retain(root, keep_last)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def _failure(action: Callable[[], Any], root: Path, step: int, need: float) -> str | None:
    """The line `action`'s failure is reported with (a full disk: the room a checkpoint needs),
    or None when it worked."""
    try:
        action()
    except UserError as err:
        return str(err)
    except OSError as err:
        if err.errno in DISK_FULL:
            return (
                f"no space left in {root} for checkpoint step {step} ({err.strerror}); a "
                f"checkpoint needs about {need:,.0f} MB there: free space or set out_dir= to a "
                "disk with room, then rerun: it resumes from the newest complete checkpoint"
            )
        return (
            f"cannot write checkpoint step {step} in {root} ({err.strerror or err}); fix the "
            "disk, then rerun: it resumes from the newest complete checkpoint"
        )
    return None


def _first_failure(accelerator, failure: str | None) -> str | None:
    """The first process's failure, on every process (a collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return failure
    return next((f for f in gather_object([failure]) if f is not None), None)


def _expected(world: int) -> list[str]:
    """The files of a checkpoint written by `world` processes."""
    ranks = [rng_name(rank) for rank in range(world)]
    return sorted([*(weights_name(role) for role in WEIGHTS), "state.pt", *ranks])


def _sealed(tmp: Path, world: int) -> list[str]:
    """The files the marker vouches for: every process's, or a refusal naming the likely cause
    (a node-local out_dir: another node's processes wrote their RNG state to their own disk)."""
    names = _expected(world)
    missing = [name for name in names if not (tmp / name).is_file()]
    if missing:
        raise UserError(
            f"{tmp} lacks {', '.join(missing[:3])} that other processes wrote: out_dir= must "
            "be a folder every node of the run shares, not a disk of one node"
        )
    return names


def _write_files(accelerator, tmp: Path, weights: dict, state: dict[str, Any]) -> None:
    _save_tensor_file(tmp / rng_name(accelerator.process_index), rng_state())
    if accelerator.is_main_process:
        for role in WEIGHTS:
            _save_tensor_file(tmp / weights_name(role), weights[role])
        _save_tensor_file(tmp / "state.pt", state)


def best_step(root: Path) -> int | None:
    """The step `root/best` copies, from its marker alone; None without a readable one (no best
    yet, or a damaged marker: `best` keeps its own copy of the files either way)."""
    try:
        return json.loads((root / "best" / MARKER).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def _retain(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (at least the newest one),
    keeping the one `best` was copied from: whatever the setting, progress is never lost."""
    complete = [p for p in _step_dirs(root) if (p / MARKER).is_file()]
    keep = set(complete[-max(1, keep_last) :])
    marked = best_step(root)
    if marked is not None:
        keep.add(root / f"step_{marked:09d}")
    for old in complete:
        if old not in keep:
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
    """True when the marker exists, lists every file of its processes, and each is present
    with its checksum."""
    marker = step_dir / MARKER
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
        if not set(_expected(meta.get("world_size") or 1)) <= set(files):
            return False
        return all(_sha256(step_dir / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def repair(run_dir: Path) -> None:
    """Finish what a process killed between two renames left, before a resume looks: a sealed
    `step_N.tmp` (its marker is written last) whose `step_N` is gone or damaged (a step saved
    twice replaces its folder) takes its place, an unsealed one is deleted; a `best` lost
    between `mark_best`'s renames comes back from its complete copy or its previous version
    (what is left of either, once `best` is whole, is deleted)."""
    root = checkpoint_root(run_dir)
    for tmp in sorted(root.glob("step_*.tmp")) if root.is_dir() else []:
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        if verify(tmp) and not verify(final):
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    best, spares = root / "best", (root / "best.tmp", root / "best.old")
    if not any(spare.exists() for spare in spares):
        return  # the usual case: no need to hash best's files at every resume
    whole = verify(best)
    for spare in spares:
        if not whole and verify(spare):
            shutil.rmtree(best, ignore_errors=True)
            spare.rename(best)
            whole = True
    for spare in spares if whole else ():
        shutil.rmtree(spare, ignore_errors=True)


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a sealed checkpoint is there (a marker; `.tmp` ones too, which `repair` puts in
    place): cheap, without reading the files, for a question asked on every process."""
    root = checkpoint_root(run_dir)
    return any((p / MARKER).is_file() for p in root.glob("step_*")) if root.is_dir() else False


def latest_valid(run_dir: Path) -> Path | None:
    """The newest verified checkpoint; a damaged newer one is skipped with a warning."""
    for step_dir in reversed(_step_dirs(checkpoint_root(run_dir))):
        if verify(step_dir):
            return step_dir
        warnings.warn(
            f"{step_dir} is incomplete or corrupt; resuming from an older checkpoint", stacklevel=2
        )
    return None


def load_tensors(path: Path) -> Any:
    """A torch.save file's contents on the host: state.pt holds the optimiser state where it
    was (cuda:0 for a GPU run), and loading it there would put every process's copy on GPU 0, or
    fail on a machine without CUDA. `load_state_dict` moves each tensor to its parameter."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state(step_dir: Path, rank: int) -> tuple[dict, dict, dict]:
    """(weights by role, loop state, this rank's RNG state) of a verified checkpoint."""
    weights = {role: load_file(str(step_dir / weights_name(role))) for role in WEIGHTS}
    state = load_tensors(step_dir / "state.pt")
    rng_file = step_dir / rng_name(rank)
    rng = load_tensors(rng_file) if rng_file.is_file() else None
    return weights, state, rng


def weights_name(role: str) -> str:
    if role not in WEIGHTS:
        raise UserError(f"role {role!r} is not one of {', '.join(WEIGHTS)}")
    return f"{role}.safetensors"


def rng_name(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def file_digest(step_dir: Path, name: str) -> str | None:
    """The sha256 of a checkpoint file as its marker records it (verify() has checked it)."""
    try:
        return json.loads((Path(step_dir) / MARKER).read_text())["files"].get(name)
    except (OSError, ValueError, KeyError):
        return None


def resolve_checkpoint(run_dir: Path, which: str = "best", train: str | None = None) -> Path:
    """The verified folder of a run's `best`, `last` (newest valid) or a checkpoint folder;
    `train`: the command that trains the run, for the message when there is none."""
    root = checkpoint_root(run_dir)
    if which == "last":
        step_dir, looked = latest_valid(run_dir), f"{root}/step_*"
    else:
        step_dir = root / "best" if which == "best" else Path(which)
        looked = str(step_dir)
    if step_dir is None or not verify(step_dir):
        raise UserError(
            f"no complete {which!r} checkpoint (looked in {looked}): train it first "
            f"({train or f'make train MODEL={Path(run_dir).name}'}) or pass --checkpoint last|PATH"
        )
    return step_dir


def checkpoint_info(step_dir: Path) -> dict[str, Any]:
    """Step, epoch (whole epochs done), mid_epoch, planned epochs and the processes that wrote a
    checkpoint folder; from its marker, or from state.pt for checkpoints written before the
    marker held them."""
    info = json.loads((Path(step_dir) / MARKER).read_text())
    if "epoch" not in info:
        state = load_tensors(Path(step_dir) / "state.pt")
        info.update(_progress(state))
    return {key: info.get(key) for key in ("step", "epoch", "mid_epoch", "epochs", "world_size")}


def run_progress(run_dir: Path) -> dict[str, Any] | None:
    """`checkpoint_info` of the newest sealed checkpoint (marker read, files not hashed): how far
    the run got. None before its first checkpoint."""
    for step_dir in reversed(_step_dirs(checkpoint_root(run_dir))):
        try:
            return checkpoint_info(step_dir)
        except (OSError, ValueError, KeyError):
            continue
    return None


def load_weights(run_dir: Path, which: str | Path = "best", role: str = "teacher") -> dict:
    """Weights of one role from a run's `best`, `last` (newest valid) or a checkpoint folder
    (a Path: already resolved and verified by `resolve_checkpoint`)."""
    step_dir = which if isinstance(which, Path) else resolve_checkpoint(run_dir, which)
    return load_file(str(step_dir / weights_name(role)))


def load_into(module: torch.nn.Module, weights: dict, source: str | Path) -> None:
    """`weights` into `module`, or one line naming `source`: weights of another architecture or
    class count (arch= or num_classes= changed since training) fail in torch with a page of
    key names, and a SLURM job would requeue on that failure forever."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:160]
        raise UserError(
            f"{source} holds a model of another shape than this config's ({detail} ...); pass "
            "the arch= and num_classes= it was trained with"
        ) from None

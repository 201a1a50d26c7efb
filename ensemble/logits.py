"""`make logits MODEL=...`: one model's TenCrop probabilities for val and test (docs/recipe.md 5).

Loads the run's saved config (`runs/<name>/config.yaml`, the resolved config it trained with;
a dataset other than the one it trained on is refused: its classes would shift) and a
checkpoint (best by default, the teacher by default), predicts every val and test image with
TenCrop and per-crop Auxiliary Fusion (`train.inference`), and writes
`logits/<name>/val.npz` (ids, probs float16, labels), `test.npz` (ids, probs) and `meta.json`,
written last so that a folder with a meta.json is complete; it records the checkpoint's step
and epoch, and a run stopped before its last epoch is named in a warning. `--float32` keeps the
probabilities in float32, for comparisons finer than float16's steps.

Nothing is chosen on images the model trained on. The fusion weight is the configured one, or
it is chosen on the run's held-out images: val for a train-split run; for a train+val run the
`holdout_per_class` images it held out (`train.data.split_train_eval`), whose probabilities go
to `holdout.npz` (ids, probs, labels) so that the ensemble can choose its weights on them too.
A train+val run that held out nothing uses `fusion_fallback`, and says so. meta.json records
which images each figure and the fusion weight come from, and whether the model trained on them.

Images are sharded over the processes of `accelerate launch` and gathered back into id order:
one row per image, the same rows whatever the number of processes. A test image that cannot be
read stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from common import provenance
from common.cli import make_command, positive_int
from common.errors import UserError, cli_main, warn
from common.fs import require_writable, write_text_atomic
from common.metrics import top1
from data_prep.layout import Layout
from ensemble.members import write_npz
from train.checkpoint import (
    MARKER,
    checkpoint_info,
    file_digest,
    load_into,
    load_weights,
    resolve_checkpoint,
    run_progress,
    weights_name,
)
from train.config import load_config, logits_dir, read_provenance, require_run_dataset, run_dir
from train.data import eval_loader, split_train_eval
from train.distributed import make_accelerator
from train.inference import (
    best_fusion,
    for_inference,
    fuse,
    predict_crops,
    resize_size,
)
from train.model import build_model, use_channels_last

SPLITS = ("val", "test")
HOLDOUT = "holdout"  # the images a train+val run held out; written as holdout.npz


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.logits", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", help="configs/models name (or a YAML path) of a trained run")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, as in training")
    parser.add_argument("--checkpoint", default="best", help="best, last or a checkpoint folder")
    parser.add_argument("--role", default="teacher", choices=("teacher", "student"))
    parser.add_argument(
        "--center-crop", action="store_true", help="plain centre crop instead of TenCrop"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per forward (TenCrop: 10 crops each); default: 64 on the CPU, "
        "2 * batch_size / crops on a GPU",
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="keep the probabilities in float32, not float16 (whose steps are 2.4e-4 at "
        "p = 0.25-0.5): for comparisons finer than that (make gpu-check's GPU/CPU agreement)",
    )
    return parser.parse_intermixed_args(argv)


def resolve_config(model: str, overrides: list[str]) -> dict[str, Any]:
    """The run's saved config when it exists (plus the overrides), else the model's config.
    `batch_size=auto` among the overrides means the micro-batch the run chose and saved."""
    cfg = load_config(model, list(overrides))
    saved = run_dir(cfg) / "config.yaml"
    if not saved.is_file():
        return cfg
    resolved = load_config(str(saved), list(overrides))
    if resolved["batch_size"] == "auto":  # a GPU's forward size is read from it
        resolved["batch_size"] = load_config(str(saved))["batch_size"]
    # The saved value was the training command's permission to change; this command gives its own.
    resolved["allow_config_change"] = cfg["allow_config_change"]
    return resolved


def load_model(
    cfg: dict[str, Any], checkpoint: str | Path, role: str, device: torch.device
) -> torch.nn.Module:
    model = build_model(cfg)
    load_into(model, load_weights(run_dir(cfg), checkpoint, role), run_dir(cfg))
    memory_format = (
        torch.channels_last if use_channels_last(cfg, device) else torch.contiguous_format
    )
    model = model.to(device, memory_format=memory_format)
    size = cfg["test_size"]
    example = torch.zeros(2, 3, size, size, device=device).contiguous(memory_format=memory_format)
    return for_inference(model, example)


CPU_IMAGES_PER_FORWARD = 64  # scripts/bench/tencrop.py: 1.26x faster than 6 images a forward


def images_per_forward(cfg: dict[str, Any], view: str, device: torch.device) -> int:
    """The default: on a GPU twice the training batch of crops (no gradients to keep), in
    images; on the CPU 64 images, whose larger convolutions oneDNN runs faster."""
    if device.type == "cpu":
        return CPU_IMAGES_PER_FORWARD
    return max(1, 2 * cfg["batch_size"] // (10 if view == "tencrop" else 1))


def predict_split(
    accelerator: Accelerator,
    model: torch.nn.Module,
    cfg: dict[str, Any],
    items: list,
    split: str,
    view: str,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Crop-averaged main (and aux) probabilities of every image of `split`, in item order."""
    loader = eval_loader(
        cfg, items, accelerator.process_index, accelerator.num_processes, batch_size, view
    )
    progress = tqdm(
        loader, desc=f"{cfg['name']} {split}", disable=not accelerator.is_local_main_process
    )
    return predict_crops(
        accelerator,
        model,
        progress,
        len(items),
        cfg["num_classes"],
        has_aux=cfg["aux_weight"] > 0,
        keep_center=split != "test" and view == "tencrop",
        channels_last=use_channels_last(cfg, accelerator.device),
    )


def heldout_items(cfg: dict[str, Any]) -> tuple[str | None, list]:
    """(split name, items) of the images the run did not train on: ("val", val) for a
    train-split run, ("holdout", its held-out images) for a train+val run, (None, []) if none."""
    _, held = split_train_eval(cfg)
    if "val" not in cfg["train_splits"]:
        return "val", held
    return (HOLDOUT, held) if held else (None, [])


def choose_fusion_weight(
    cfg: dict[str, Any], heldout: dict[str, torch.Tensor] | None, labels: torch.Tensor | None
) -> tuple[float, str]:
    """(w, where it comes from): the config's fusion_weight, or the best on the held-out
    images (ties -> smaller w), or fusion_fallback when there are none; 0 without a head."""
    if cfg["aux_weight"] <= 0:
        return 0.0, "no auxiliary head"
    if cfg["fusion_weight"] is not None:
        return float(cfg["fusion_weight"]), "config"
    if heldout is None:
        return float(cfg["fusion_fallback"]), "fusion_fallback (no held-out images)"
    weight, _ = best_fusion(heldout["main"], heldout["aux"], labels)
    return round(weight, 4), "chosen on held-out images"


def kept_dtype(args: argparse.Namespace) -> type[np.floating]:
    """The files' probabilities: float16 (half the ensemble's reading) unless `--float32`."""
    return np.float32 if args.float32 else np.float16


def stored(probs: torch.Tensor, dtype: type[np.floating]) -> np.ndarray:
    """Probabilities at the precision the files keep."""
    return probs.numpy().astype(dtype)


def stored_top1(probs: torch.Tensor, labels: torch.Tensor, dtype: type[np.floating]) -> float:
    """Top-1 of `probs` as stored: what `make ensemble` will measure from the file."""
    return top1(torch.from_numpy(stored(probs, dtype).astype(np.float32)), labels)


def _items(layout: Layout, split: str) -> list:
    items = layout.split_items("val") if split == "val" else layout.test_items()
    if not items:
        raise UserError(f"{layout.root} has no {split} images; rerun `make data`")
    return items


def split_scores(
    probs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    weight: float,
    view: str,
    dtype: type[np.floating],
) -> dict[str, float | None]:
    """Top-1 of one labelled split as stored: fused, unfused, and TenCrop / centre crop."""
    fused = stored_top1(fuse(probs["main"], probs.get("aux"), weight), labels, dtype)
    center = fused
    if "center_main" in probs:
        center = stored_top1(
            fuse(probs["center_main"], probs.get("center_aux"), weight), labels, dtype
        )
    return {
        "top1": fused,
        "top1_unfused": stored_top1(probs["main"], labels, dtype),
        "top1_tencrop": fused if view == "tencrop" else None,
        "top1_center": center,
    }


def build_meta(
    cfg: dict[str, Any],
    args: argparse.Namespace,
    fusion: tuple[float, str],
    heldout_split: str | None,
    probs: dict[str, dict[str, torch.Tensor]],
    labels: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """meta.json: where the probabilities come from, the fusion weight and the images it was
    chosen on, and per labelled split its top-1s, its size and whether the model trained on it."""
    view = "center" if args.center_crop else "tencrop"
    weight, source = fusion
    dtype = kept_dtype(args)
    chosen_on = None
    if source == "chosen on held-out images":
        chosen_on = {"split": heldout_split, "images": len(labels[heldout_split])}
    scores = {
        split: {
            "images": len(labels[split]),
            "trained_on": split in cfg["train_splits"],
            **split_scores(probs[split], labels[split], weight, view, dtype),
        }
        for split in labels
    }
    return {
        "model": cfg["name"],
        "arch": cfg["arch"],
        "run_dir": str(run_dir(cfg).resolve()),  # checked by `make ensemble` from any folder
        "make_logits": make_command("logits", args.model, args.overrides),
        "checkpoint": args.checkpoint,
        "role": args.role,
        "view": view,
        "probs_dtype": np.dtype(dtype).name,
        "test_size": cfg["test_size"],
        "resize_size": resize_size(cfg),
        "fusion_weight": weight,
        "fusion_weight_from": source,
        "fusion_weight_chosen_on": chosen_on,
        # The images this model did not train on (val, holdout, or none): the only figures
        # that measure it, and the only images anything was chosen on.
        "heldout_split": heldout_split,
        "scores": scores,
        "num_classes": cfg["num_classes"],
        "data_dir": str(cfg["data_dir"]),
    }


@contextlib.contextmanager
def unchanged_checkpoint(step_dir: Path, remake: str) -> Iterator[None]:
    """The block reads `step_dir` as one checkpoint: a `best` replaced meanwhile (its run still
    training) would give one checkpoint's weights under another's step and digest, and `make
    ensemble` would then take stale logits for fresh ones."""

    def marker() -> bytes | None:
        try:
            return (step_dir / MARKER).read_bytes()
        except FileNotFoundError:  # between mark_best's two renames
            return None

    before = marker()
    try:
        yield
    except FileNotFoundError:
        if marker() == before:
            raise
    if marker() != before:
        raise UserError(
            f"{step_dir} was replaced while it was read (its run is still training?); rerun "
            f"`{remake}` once the run has ended"
        )


def checkpoint_meta(cfg: dict[str, Any], step_dir: Path, announce: str) -> dict[str, Any]:
    """The checkpoint's folder, step and epoch for meta.json; with `announce` (the command that
    trains the run), a warning when the run stopped before its last epoch (its best so far is
    not the finished model's)."""
    info = checkpoint_info(step_dir)
    progress = run_progress(run_dir(cfg)) or info
    epochs = progress["epochs"] or cfg["epochs"]
    stopped = progress["epoch"] is not None and progress["epoch"] < epochs
    if stopped and announce:
        warn(
            f"run {cfg['name']} stopped early, after {progress['epoch']} of {epochs} epochs "
            f"(newest checkpoint: step {progress['step']}); these logits come from {step_dir} "
            f"(step {info['step']}) of an unfinished model: `{announce}` "
            "finishes it"
        )
    return {
        "checkpoint_dir": str(step_dir),
        "checkpoint_step": info["step"],
        "checkpoint_epoch": info["epoch"],
        "checkpoint_mid_epoch": info["mid_epoch"],
        "epochs": epochs,
        "run_finished": not stopped,
    }


def logits_provenance(
    cfg: dict[str, Any], layout: Layout, step_dir: Path, digest: str | None, items: dict[str, list]
) -> dict[str, Any]:
    """This command's provenance, the sha256 of the weights it loaded, the training run's
    provenance (its config.yaml) and the hash of each split's ids: what `make ensemble` checks
    members against."""
    saved = run_dir(cfg) / "config.yaml"
    return {
        **provenance.record(cfg, layout.manifest),
        "checkpoint_dir": str(step_dir),
        "checkpoint_sha256": digest,
        "training": read_provenance(saved) if saved.is_file() else {},
        "ids_sha256": {
            split: provenance.ids_hash([i[0] for i in rows]) for split, rows in items.items()
        },
    }


def summary_line(cfg: dict[str, Any], meta: dict[str, Any]) -> str:
    """What the figures are: held-out (with the image count) or trained on, said plainly."""
    held, scores = meta["heldout_split"], meta["scores"]
    parts = []
    if held is None:
        parts.append("no held-out images")
    else:
        parts.append(
            f"held-out top-1 {scores[held]['top1']:.2f}% ({held}, {scores[held]['images']} images)"
        )
    if scores["val"]["trained_on"]:
        parts.append(f"val top-1 {scores['val']['top1']:.2f}% (trained on)")
    where = meta["fusion_weight_from"]
    if meta["fusion_weight_chosen_on"] is not None:
        where = f"chosen on the {scores[held]['images']} held-out images"
    parts.append(f"{meta['view']}, fusion weight {meta['fusion_weight']} ({where})")
    return f"{cfg['name']}: " + "; ".join(parts)


def write_outputs(folder: Path, arrays: dict[str, dict[str, np.ndarray]], meta: dict) -> None:
    """The npz files first, meta.json last: its presence marks a complete folder. A rerun
    removes the old meta.json first, so that one cut short never leaves new arrays beside the
    old record (another role, precision or checkpoint) looking complete."""
    (folder / "meta.json").unlink(missing_ok=True)
    for split, split_arrays in arrays.items():
        write_npz(folder / f"{split}.npz", **split_arrays)
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=1) + "\n")


def write_split_arrays(
    items: dict[str, list],
    probs: dict[str, dict[str, torch.Tensor]],
    weight: float,
    dtype: type[np.floating],
) -> dict[str, dict[str, np.ndarray]]:
    """Each split's ids and fused probabilities (and labels, for the labelled splits)."""
    arrays = {}
    for split, split_items in items.items():
        arrays[split] = {
            "ids": np.array([item[0] for item in split_items], dtype=str),
            "probs": stored(fuse(probs[split]["main"], probs[split].get("aux"), weight), dtype),
        }
        if split != "test":
            arrays[split]["labels"] = np.array([item[2] for item in split_items], dtype=np.int64)
    return arrays


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = resolve_config(args.model, args.overrides)
    view = "center" if args.center_crop else "tencrop"
    layout = Layout(Path(cfg["data_dir"]))
    layout.require_classes(cfg["num_classes"])
    require_run_dataset(cfg, "predict")  # another class list would shift every class index
    require_writable(logits_dir(cfg), "pass logits_dir= a folder you can write")
    items = {split: _items(layout, split) for split in SPLITS}
    heldout_split, held = heldout_items(cfg)
    if heldout_split == HOLDOUT:
        items[HOLDOUT] = held
    accelerator = make_accelerator(cfg["mixed_precision"])
    train = make_command("train", args.model, args.overrides)
    step_dir = resolve_checkpoint(run_dir(cfg), args.checkpoint, train)
    with unchanged_checkpoint(step_dir, make_command("logits", args.model, args.overrides)):
        source_meta = checkpoint_meta(cfg, step_dir, train if accelerator.is_main_process else "")
        model = load_model(cfg, step_dir, args.role, accelerator.device)
        digest = file_digest(step_dir, weights_name(args.role))
    batch_size = args.batch_size or images_per_forward(cfg, view, accelerator.device)
    probs = {
        split: predict_split(accelerator, model, cfg, split_items, split, view, batch_size)
        for split, split_items in items.items()
    }
    labels = {
        split: torch.tensor([item[2] for item in split_items])
        for split, split_items in items.items()
        if split != "test"
    }
    fusion = choose_fusion_weight(cfg, probs.get(heldout_split), labels.get(heldout_split))
    meta = build_meta(cfg, args, fusion, heldout_split, probs, labels)
    meta["rows"] = {split: len(split_items) for split, split_items in items.items()}
    meta.update(source_meta)
    meta["processes"] = accelerator.num_processes
    meta["provenance"] = logits_provenance(cfg, layout, step_dir, digest, items)
    if accelerator.is_main_process:
        write_outputs(
            logits_dir(cfg), write_split_arrays(items, probs, fusion[0], kept_dtype(args)), meta
        )
        print(f"{summary_line(cfg, meta)}; wrote {logits_dir(cfg)}/")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # several processes: their group ends here, not at exit (a warning)
    return meta


if __name__ == "__main__":
    main()

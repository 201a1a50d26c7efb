"""`make ensemble`: the weighted mean of several models' probabilities, and the submission.

docs/recipe.md 5: the paper averages the TenCrop probabilities of its 16 models and takes the
argmax.
Models come from an ensemble config (`configs/ensembles/<name>.yaml`: `models`, optional
`weights`) or from `--models`; weights are equal by default (the paper's), or given (`--weights`
or the config), or searched on the images every member held out (`--search-weights`, ours: see
`ensemble.search`). Every model is aligned by id with the first (`ensemble.members`), and the
mean is streamed: one model's arrays and the running float32 sum are in memory at a time,
whatever the number of models. Writes `submissions/<name>.csv` (test index order), `<name>.zip`
and `<name>.json` (models, weights and the images they were chosen on, top-1 of each model and
of the ensemble on val and on the images every member held out, each member's provenance),
then prints the table. Every
figure names its images: "held-out" with the count, or "trained on" when a model trained on them
(final models train on val).

A submission's name is held by one process at a time (`submissions/.<name>.lock`), its report
is removed first and written last (a report vouches for the CSV and zip beside it), and a
report made from another config file of the same name is not replaced unless `--name` says so.
The members' dataset, where it is on disk, must be the one their logits were made on.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import provenance
from common.cli import is_one_name, name_arg, non_negative_float
from common.errors import UserError, cli_main, warn
from common.fs import require_writable, write_text_atomic
from common.lock import FileLock
from common.metrics import top1
from data_prep.layout import Layout, test_index
from data_prep.splits import NUM_CLASSES  # the challenge scores the test images of all of them
from ensemble.members import Member, SplitReader, check_provenance, open_members
from ensemble.search import (
    HeldOut,
    common_heldout,
    heldout_loader,
    search_weights,
    weighted_sum,
)
from ensemble.submission import write_submission
from train.config import (
    CONFIG_DIR,
    available,
    config_layer,
    config_name,
    config_path,
    load_config,
)

ENSEMBLE_KEYS = ("models", "weights", "description")


@dataclass
class Blend:
    """The weighted mean of one split: reference ids, mean probabilities, labels (val only)."""

    ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray | None
    member_top1: dict[str, float]

    def top1(self) -> float | None:
        return None if self.labels is None else top1(self.probs, self.labels)


def blend_split(members: list[Member], weights: Sequence[float], split: str) -> Blend:
    """Weighted mean of the members' `split` probabilities, streamed one member at a time."""
    reader = SplitReader(split)
    total = scratch = None
    member_top1 = {}
    for member, weight in zip(members, weights, strict=True):
        probs = reader.read(member)
        if total is None:
            total = np.zeros(probs.shape, dtype=np.float32)
        if reader.labels is not None:
            member_top1[member.name] = top1(probs, reader.labels)
        if weight == 1.0:
            np.add(total, probs, out=total)  # casts chunk by chunk: no full-size float32 copy
        elif weight > 0:
            if scratch is None:
                scratch = np.empty_like(total)
            np.multiply(probs, np.float32(weight), out=scratch, dtype=np.float32)
            total += scratch
        del probs
    total /= np.float32(sum(weights))
    return Blend(reader.ids, total, reader.labels, member_top1)


def load_ensemble_config(name: str) -> dict[str, Any]:
    """configs/ensembles/<name>.yaml, or a .yaml path: `models` (a list of names), optional
    `weights` (one number per model) and `description`."""
    return ensemble_config(name)[0]


def ensemble_config(name: str) -> tuple[dict[str, Any], str]:
    """`load_ensemble_config`'s config, checked, and the file it comes from."""
    data, origin = config_layer("ensembles", name)
    unknown = sorted(set(data) - set(ENSEMBLE_KEYS))
    models = data.get("models")
    if unknown or not isinstance(models, list) or not models:
        raise UserError(
            f"{origin}: needs a `models:` list (unknown keys: {', '.join(unknown) or 'none'}; "
            f"valid: {', '.join(ENSEMBLE_KEYS)})"
        )
    if not all(isinstance(m, str) and is_one_name(m) for m in models):
        raise UserError(f"{origin}: models {models} must each be a model or run name")
    weights = data.get("weights")
    numbers = isinstance(weights, list) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights
    )
    if weights is not None and not numbers:
        raise UserError(f"{origin}: weights {weights!r} must be a list of numbers, one per model")
    return data, origin


WEIGHT_RANGE = (1e-30, 1e30)  # within float32's normal numbers, with room for 16 members' sum


def check_weights(weights: Sequence[float], models: Sequence[str], origin: str) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise UserError(f"{origin}: {len(weights)} weights for {len(models)} models; give one each")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"{origin}: weights {weights} must be finite, >= 0, and not all 0")
    if any(w > 0 and not WEIGHT_RANGE[0] <= w <= WEIGHT_RANGE[1] for w in weights):
        # The blend sums in float32: 1e308 overflows it and 1e-320 is 0 there (all class 0).
        raise UserError(
            f"{origin}: weights {weights} must be 0 or in [{WEIGHT_RANGE[0]:g}, "
            f"{WEIGHT_RANGE[1]:g}]; scale them (only their ratios count)"
        )
    return weights


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.blend", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="configs/ensembles name (vipriors16, demo)")
    source.add_argument("--models", nargs="+", help="logits folder names under --logits-dir")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model")
    parser.add_argument(
        "--search-weights",
        action="store_true",
        help="choose weights on the images every member held out (equal if there are none)",
    )
    parser.add_argument(
        "--min-gain", type=non_negative_float, default=0.1, help="search: points per move"
    )
    parser.add_argument(
        "--name", type=name_arg, help="submission name (default: the config name, or ensemble)"
    )
    parser.add_argument(
        "--logits-dir",
        type=Path,
        help="where `make logits` wrote (default: logits_dir of the first model's config)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("submissions"))
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value as given to `make logits` (logits_dir=..., data=...): where the logits are",
    )
    args = parser.parse_intermixed_args(argv)  # ARGS may mix flags and key=value
    if args.weights and args.search_weights:
        parser.error("--weights and --search-weights exclude each other")
    return args


def resolve_models(args: argparse.Namespace) -> tuple[str, list[str], list[float] | None, str]:
    """(name, models, given weights or None, where the weights come from)."""
    if args.config:
        config, origin = ensemble_config(args.config)
        name, models = args.name or config_name(args.config), list(config["models"])
        weights = config.get("weights")
        if weights is not None and args.search_weights:
            warn(f"{origin}'s weights are not used: --search-weights starts from equal weights")
    else:
        name, models, weights, origin = args.name or "ensemble", args.models, None, "equal"
        overrides = [m for m in models if "=" in m]
        if overrides:
            raise UserError(
                f"--models took {' '.join(overrides)} as model names: give key=value overrides "
                "before --models"
            )
    if args.weights:
        weights, origin = args.weights, "--weights"
    if weights is None:
        return name, models, None, "equal"
    return name, models, check_weights(weights, models, origin), origin


def logits_root(models: list[str], overrides: list[str], given: Path | None = None) -> Path:
    """`given` (--logits-dir), else the folder that `make logits` wrote with the same overrides:
    the first model's logits_dir (base.yaml's when the model is a run name, not a config); the
    overrides are checked as `make logits` checks them."""
    if given is not None:
        return given
    first = models[0] if models[0] in available("models") else str(CONFIG_DIR / "base.yaml")
    return Path(load_config(first, overrides)["logits_dir"])


def val_trained_on(member: Member) -> bool:
    """Whether the member trained on val (unrecorded counts as trained on: a figure is called
    held-out only when its meta.json says so)."""
    return member.meta.get("scores", {}).get("val", {}).get("trained_on", True)


def member_row(member: Member) -> tuple[dict[str, Any], str]:
    """The member's own figures (its held-out images, else val) and what they were measured on."""
    scores, held = member.meta.get("scores", {}), member.meta.get("heldout_split")
    if held is not None:
        return scores[held], f"held-out {held} ({scores[held]['images']} images)"
    val = scores.get("val", {})
    return val, f"val ({val.get('images', '?')} images, trained on)"


def format_table(
    members: list[Member], weights: list[float], ensemble_top1: float, ensemble_on: str
) -> str:
    """Each model's top-1 (TenCrop and centre crop, from its meta.json), then the ensemble's,
    each with the images it was measured on."""

    def cell(value: float | None) -> str:
        return f"{value:9.2f}" if value is not None else f"{'-':>9}"

    total = sum(weights)
    width = max(len("ensemble"), *(len(m.name) for m in members))
    lines = [f"{'model':<{width}}  {'weight':>6}  {'TenCrop':>9}  {'centre':>9}  top-1 (%) on"]
    for member, weight in zip(members, weights, strict=True):
        scores, on = member_row(member)
        lines.append(
            f"{member.name:<{width}}  {weight / total:6.3f}  {cell(scores.get('top1_tencrop'))}"
            f"  {cell(scores.get('top1_center'))}  {on}"
        )
    lines.append(f"{'ensemble':<{width}}  {1:6.3f}  {cell(ensemble_top1)}  {'':>9}  {ensemble_on}")
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")


def submission_order(ids: np.ndarray) -> np.ndarray:
    """Row order of the submission: test index order (img_0, img_1, ...)."""
    return np.argsort([test_index(str(i)) for i in ids], kind="stable")


def val_summary(members: list[Member], weights: list[float]) -> dict[str, Any]:
    """Val top-1 of each member and of the ensemble, and which members trained on val (their
    val figures are not held out); the val arrays are freed on return."""
    val = blend_split(members, weights, "val")
    return {
        "images": len(val.ids),
        "trained_on_by": [m.name for m in members if val_trained_on(m)],
        "top1": {"models": val.member_top1, "ensemble": val.top1()},
    }


def heldout_summary(
    members: list[Member], weights: list[float], held: HeldOut | str
) -> dict[str, Any] | None:
    """Top-1 of each member and of the ensemble on the images every member held out."""
    if isinstance(held, str):
        return None
    load = heldout_loader(members, held, np.arange(len(held.ids)))
    models = {m.name: top1(load(j), held.labels) for j, m in enumerate(members)}
    ensemble = top1(weighted_sum(load, weights), held.labels)
    return {**held.provenance(), "top1": {"models": models, "ensemble": ensemble}}


def ensemble_figure(
    val: dict[str, Any], heldout: dict[str, Any] | None, searched: bool
) -> tuple[float, str]:
    """The ensemble's top-1 for the table: on the shared held-out images when there are any
    (noting when the weights were chosen on those same images)."""
    if heldout is not None:
        chosen = "; weights chosen on them" if searched else ""
        on = f"held-out ({heldout['images']} images, all models{chosen})"
        return heldout["top1"]["ensemble"], on
    trained = ", trained on" if val["trained_on_by"] else ", held-out"
    return val["top1"]["ensemble"], f"val ({val['images']} images{trained})"


def submission_provenance(members: list[Member], warnings: list[str]) -> dict[str, Any]:
    """The blend's own code and versions, and each member's record from its meta.json: the
    commits, config hashes, dataset checksum and checkpoint digest behind every row."""
    return {
        **provenance.code_state(),
        "versions": provenance.versions(),
        "members": {m.name: m.meta.get("provenance") for m in members},
        "warnings": warnings,
    }


def config_file(args: argparse.Namespace) -> str | None:
    """The ensemble config's file, resolved wherever the command runs from: what a
    submission's name stands for."""
    return str(config_path("ensembles", args.config).resolve()) if args.config else None


def claim_name(report_path: Path, config: str | None, named: bool) -> None:
    """Refuse to replace a submission made from another config file of the same name (two
    folders' vipriors16.yaml) unless the name was given."""
    try:
        earlier = json.loads(report_path.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if config and earlier and earlier != config and not named:
        raise UserError(
            f"{report_path} was made from {earlier}, not {config}; pass --name (make ensemble "
            f"NAME=...) to keep both, or delete {report_path}"
        )


def dataset_checks(members: list[Member]) -> tuple[Path | None, list[str]]:
    """The members' dataset folder (absolute) and warnings about it. Refuses a dataset rebuilt
    since their logits (the CSV's ids and classes would not be its own); warns when it is a
    partial ImageNet build, whose submission the server would score on a subset."""
    data_dir = members[0].meta.get("data_dir")
    if data_dir is None:
        return None, []
    layout = Layout(Path(data_dir))
    if not layout.manifest.is_file():
        return layout.root.resolve(), []
    manifest = layout.read_manifest()
    made_on = (members[0].meta.get("provenance") or {}).get("dataset_checksum")
    if made_on and manifest.get("checksum") not in (None, made_on):
        raise UserError(
            f"{data_dir} was rebuilt since the members' logits were made (manifest checksum "
            f"{manifest['checksum'][:12]}, theirs {made_on[:12]}); rerun `make logits` for each"
        )
    classes = len(manifest["classes"])
    if manifest.get("source") == "imagenet" and classes != NUM_CLASSES:
        return layout.root.resolve(), [
            f"{data_dir} is a partial ImageNet build ({classes} of {NUM_CLASSES} "
            "classes): this submission is not a full VIPriors submission"
        ]
    return layout.root.resolve(), []


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    require_writable(args.out_dir, "pass --out-dir a folder you can write")
    name, models, weights, origin = resolve_models(args)
    new_folder = not args.out_dir.exists()
    lock = FileLock(args.out_dir / f".{name}.lock", f"submission {name}", "wait, or pass --name")
    with lock:
        try:
            return blend_and_write(args, name, models, weights, origin)
        finally:
            # No lock file left among the submissions, nor a folder made for nothing.
            lock.remove_file(folder_too=new_folder)


def blend_and_write(
    args: argparse.Namespace, name: str, models: list[str], weights: list[float] | None, origin: str
) -> dict[str, Any]:
    """`main` once the submission's name is held: blend, write, report."""
    report_path, config = args.out_dir / f"{name}.json", config_file(args)
    claim_name(report_path, config, named=args.name is not None)
    root = logits_root(models, args.overrides, args.logits_dir)
    members = open_members(root, models, args.overrides)
    data_dir, odd = dataset_checks(members)
    warnings = check_provenance(members) + odd
    for warning in warnings:
        warn(warning)
    search = None
    if args.search_weights:
        weights, search = search_weights(members, args.min_gain)
        if search["accepted"]:
            origin = "search"
        elif search["chosen_on"] is None:
            origin = "equal (no search: no image held out by every model)"
            print(f"note: weights stay equal: {search['skipped']}")
        else:
            origin = "equal (search not better, cross-validated on the held-out images)"
    weights = weights or [1.0] * len(members)
    val = val_summary(members, weights)
    heldout = heldout_summary(members, weights, common_heldout(members))
    test = blend_split(members, weights, "test")
    order = submission_order(test.ids)
    num_classes = int(test.probs.shape[1])
    csv_path = args.out_dir / f"{name}.csv"
    report_path.unlink(missing_ok=True)  # until this run's is written, none vouches for the CSV
    zip_path = write_submission(
        csv_path, test.ids[order].tolist(), test.probs.argmax(1)[order], num_classes
    )
    report = {
        "name": name,
        "config": config,
        "models": models,
        "weights": [w / sum(weights) for w in weights],
        "weights_from": origin,
        "weights_chosen_on": search["chosen_on"] if origin == "search" else None,
        "val": val,
        "heldout": heldout,
        "member_scores": {m.name: m.meta.get("scores") for m in members},
        "search": search,
        "num_classes": num_classes,
        "data_dir": None if data_dir is None else str(data_dir),
        "rows": {"val": val["images"], "test": len(test.ids)},
        "csv": str(csv_path),
        "zip": str(zip_path),
        "provenance": submission_provenance(members, warnings),
    }
    write_report(report_path, report)
    figure = ensemble_figure(val, heldout, origin == "search")
    print(format_table(members, weights, *figure))
    print(f"wrote {csv_path}, {zip_path} and {report_path}")
    return report


if __name__ == "__main__":
    main()

"""`make smoke [MODELS="..."]`: every real config through the real stages on the CPU, in bf16.

`--precision native` trains in the precision this CPU computes natively: bf16 where it has
AVX512-BF16 or AMX, fp32 where it has not (there bf16 is emulated, about 9x slower: the CI
subset would not fit the suite's 20 minutes). The suite uses it; bf16's semantics stay covered
by tests/test_smoke.py's unit test. The default stays bf16, with a warning on such a CPU.

A user's first GPU run must not be the first time a real config runs. For each model of the
paper's ensemble (configs/ensembles/vipriors16.yaml) and the ablation's EfficientNet-B2, at the
config's own architecture, resolutions, loss and optimiser settings, under `mixed_precision=bf16`
(or the CPU's native precision, above):

1. data: a generated tree of the real 1,000 class folders, built by `python -m data_prep folder
   --at-most`. Only two classes hold images (4 and 3; at most 2 train, 1 val, 1 test each),
   so that TenCrop at 448-512 px stays affordable on two cores: 2 val images and 1 test image.
2. train: `python -m train.launch` (as `make train`) for exactly two optimiser steps (one epoch)
   of one micro-batch of 2 (Mixup/CutMix mix images in pairs, so no real config takes an odd
   batch): 4 training images, for the final configs (which train on train+val) 4 of the 6 once
   1 image per class is held out (HOLDOUT: theirs is 2 of 100 per class, 2 of 3 here would add
   2 TenCrop images of the costliest stage). Gradient accumulation is the recipe's, not the
   network's: `make chaos` kills and resumes it bit for bit (until 2026-12-07 the smoke
   accumulated 2 micro-batches per step, twice the training compute for no network it did not
   already run). A checkpoint after every step, SIGKILL of the whole process tree once the
   first checkpoint is complete, then the same command, which must resume and finish
   (evaluation, best checkpoint, metrics).
   Checks: the run said its precision; checkpointed weights and optimiser state are float32.
3. logits: `python -m ensemble.logits` (TenCrop at the config's test_size); finite probabilities.
   `--center-crop` predicts the centre crop alone (the suite's subset): one view of the same
   network at the same size instead of ten, 75 s -> 15 s for DSK-ResNeXt101 at 448 px on one
   thread (2026-12-07); TenCrop is the same code at every size (tests/test_logits.py) and its
   crops always fit (the config refuses a test_resize_ratio above 1).
Then `python -m ensemble.blend` over every model and `python -m ensemble.evaluate` on its
submission. Each model's times are printed and appended to <work>/times.csv as it finishes; the
default order takes each architecture and resolution once before the seeds that repeat them, so
that a run cut short has covered every distinct network.
Checkpoints are deleted after a model's logits (unless --keep): 17 configs would need 20 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from common.errors import cli_main, warn
from common.processes import kill_tree
from data_prep.layout import Layout
from scripts.ops.plan import plan_models
from scripts.stages import ROOT, child_env
from train.checkpoint import load_tensors
from train.config import load_config, logits_dir, run_dir
from train.data import split_train_eval
from train.distributed import cpu_has_native_bf16

CLASSES = 1000
POPULATED = {0: 4, 1: 3}  # class index -> images in its folder; 998 folders are empty
PER_CLASS = "2,1,1"  # at most 2 train, 1 val, 1 test per class
HOLDOUT = 1  # images per class held out by the configs that hold some out (theirs: 2)
MICRO_BATCH = 2  # the smallest even batch: mixing pairs images
STEPS = 2  # optimiser steps per run: one epoch
# The suite's subset: each family at its config's real resolution, and each recipe path. The
# EfficientNet and DSK-ResNeXt101 run the full recipe (train split; train+val with held-out
# images, 448 px), the ResNet the Strong Baseline of Table 1 (one view, dropout). ResNet-152 at
# 448 px is DSK-ResNeXt101's timm ResNet with other blocks, at 4.6x ResNet-50's cost at 320 px
# (171 s against 37 s, one thread, 2026-12-07): `make smoke` runs it, the suite does not.
CI_MODELS = ("effnet_b2_ablation", "table1_resnet50", "dsk_resnext101_s0")
TIMES_HEADER = "model,arch,img_size,test_size,micro_batch,grad_accum,train_s,logits_s,total_s"


class SmokeFailure(Exception):
    """A stage failed or wrote something wrong: a bug for the pipeline, not the user's input."""


def make_source(root: Path) -> Path:
    """1,000 class folders; the POPULATED ones hold small noise JPEGs of their own tint."""
    rng = np.random.default_rng(0)
    for index in range(CLASSES):
        folder = root / f"class_{index:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(POPULATED.get(index, 0)):
            path = folder / f"img_{i}.jpg"
            if not path.is_file():
                pixels = rng.integers(0, 256, (120, 160, 3)) // 2 + 60 * (index + 1)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG")
    return root


def run_logged(args: list[str], log: Path) -> subprocess.CompletedProcess:
    """`python -m ...` from the repository root, output to `log`; a failure names the log."""
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", *args], cwd=ROOT, env=child_env(), stdout=out, stderr=out
        )
    if proc.returncode != 0:
        raise SmokeFailure(f"`python -m {' '.join(args)}` exited {proc.returncode}: {tail(log)}")
    return proc


def tail(log: Path, lines: int = 5) -> str:
    return f"see {log}: " + " | ".join(log.read_text().splitlines()[-lines:])


def build_data(work: Path) -> Path:
    source = make_source(work / "source" / "smoke1000")
    data = work / "data" / "smoke1000"
    args = ["data_prep", "folder", "--root", str(source), "--per-class", PER_CLASS, "--at-most"]
    run_logged([*args, "--out", str(data)], work / "logs" / "data.log")
    return data


def data_overrides(name: str, data: Path) -> list[str]:
    """The generated dataset, and the held-out share of it that a final config can afford."""
    extra = [f"data_dir={data}"]
    if load_config(name)["holdout_per_class"]:
        extra.append(f"holdout_per_class={HOLDOUT}")
    return extra


def micro_batches(cfg: dict[str, Any]) -> tuple[int, int]:
    """(batch_size, grad_accum) that make one epoch of exactly STEPS optimiser steps."""
    images = len(split_train_eval(cfg)[0])
    accum, rest = divmod(images, MICRO_BATCH * STEPS)
    if rest or accum < 1:
        raise SmokeFailure(f"{images} training images make no {STEPS} steps")
    return MICRO_BATCH, accum


def newest_step(run: Path) -> int:
    done = [
        int(p.name.split("_")[1])
        for p in (run / "checkpoints").glob("step_*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "COMPLETE").is_file()
    ]
    return max(done, default=0)


def train_killed_at_first_checkpoint(args: list[str], run: Path, log: Path) -> None:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "train.launch", *args],
            cwd=ROOT,
            env=child_env(),
            stdout=out,
            stderr=out,
        )
        while proc.poll() is None and newest_step(run) < 1:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SmokeFailure(
                f"training ended (status {proc.returncode}) before its kill: {tail(log)}"
            )
        kill_tree(proc.pid)
        proc.wait()
    precision = next(a.split("=", 1)[1] for a in args if a.startswith("mixed_precision="))
    if f"precision {precision}" not in log.read_text():
        raise SmokeFailure(f"the run did not train in {precision}: {tail(log)}")
    if newest_step(run) >= STEPS:
        raise SmokeFailure(f"the kill came after the last step; {tail(log)}")


def check_checkpoint(run: Path) -> None:
    """Mixed precision keeps float32 masters: weights and optimiser state stay float32."""
    best = run / "checkpoints" / "best"
    for role in ("student", "teacher"):
        dtypes = {t.dtype for t in load_file(best / f"{role}.safetensors").values()}
        if dtypes - {torch.float32, torch.int64}:
            raise SmokeFailure(f"{best}/{role}.safetensors holds {sorted(map(str, dtypes))}")
    state = load_tensors(best / "state.pt")
    slots = [v for s in state["optimizer"]["state"].values() for v in s.values()]
    dtypes = {v.dtype for v in slots if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if dtypes != {torch.float32}:
        raise SmokeFailure(f"{best}/state.pt: optimiser state in {sorted(map(str, dtypes))}")


def check_logits(folder: Path, layout: Layout, view: str) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    expected = {"val": len(layout.split_items("val")), "test": len(layout.test_items())}
    # (a train+val run also writes its held-out images: holdout.npz)
    rows = {split: meta["rows"].get(split) for split in expected}
    if rows != expected or meta["view"] != view:
        raise SmokeFailure(f"{folder}/meta.json: rows {meta['rows']}, expected {expected}")
    for split in expected:
        with np.load(folder / f"{split}.npz", allow_pickle=False) as arrays:
            probs = arrays["probs"].astype(np.float64)
        if probs.shape != (expected[split], CLASSES) or not np.isfinite(probs).all():
            raise SmokeFailure(f"{folder}/{split}.npz: probabilities of shape {probs.shape}")
        if np.abs(probs.sum(1) - 1).max() > 1e-2:
            raise SmokeFailure(f"{folder}/{split}.npz: rows do not sum to 1")


def smoke_model(
    name: str, work: Path, data: Path, keep: bool, precision: str, view: str
) -> dict[str, Any]:
    """The stages of one config, its logits in `view` (tencrop or center); returns its row of
    times."""
    started = time.perf_counter()
    base = [*data_overrides(name, data), f"out_dir={work / 'runs'}"]
    base.append(f"logits_dir={work / 'logits'}")
    cfg = load_config(name, base)
    micro, accum = micro_batches(cfg)
    args = [
        name,
        *base,
        f"mixed_precision={precision}",
        "epochs=1",
        f"batch_size={micro}",
        f"grad_accum={accum}",
        "ckpt_every_steps=1",
        "workers=1",
    ]
    run, logs = run_dir(cfg), work / "logs"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, so that the kill lands mid-run
    train_killed_at_first_checkpoint(args, run, logs / f"{name}.train1.log")
    second = logs / f"{name}.train2.log"
    run_logged(["train.launch", *args], second)
    if "resumed from" not in second.read_text():
        raise SmokeFailure(f"the rerun did not resume: {tail(second)}")
    check_checkpoint(run)
    trained = time.perf_counter()
    crop = ["--center-crop"] if view == "center" else []
    run_logged(["ensemble.logits", *args, *crop], logs / f"{name}.logits.log")
    check_logits(logits_dir(cfg), Layout(data), view)
    if not keep:
        shutil.rmtree(run / "checkpoints")
    done = time.perf_counter()
    return {
        "model": name,
        "arch": cfg["arch"],
        "img_size": cfg["img_size"],
        "test_size": cfg["test_size"],
        "micro_batch": micro,
        "grad_accum": accum,
        "train_s": trained - started,
        "logits_s": done - trained,
        "total_s": done - started,
    }


def append_times(path: Path, row: dict[str, Any]) -> None:
    if not path.is_file():
        path.write_text(TIMES_HEADER + "\n")
    values = [f"{v:.0f}" if isinstance(v, float) else str(v) for v in row.values()]
    with open(path, "a") as out:
        out.write(",".join(values) + "\n")


def format_times(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | arch | train px | test px | micro x accum | train, kill, resume (s) "
        "| logits (s) | total (s) |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['img_size']} | {r['test_size']} "
            f"| {r['micro_batch']} x {r['grad_accum']} | {r['train_s']:.0f} "
            f"| {r['logits_s']:.0f} | {r['total_s']:.0f} |"
        )
    return "\n".join(lines)


def ensemble_and_evaluate(names: list[str], work: Path, data: Path) -> str:
    blend = ["ensemble.blend", "--models", *names, "--name", "smoke"]
    blend += ["--logits-dir", str(work / "logits"), "--out-dir", str(work / "submissions")]
    run_logged(blend, work / "logs" / "ensemble.log")
    submission = work / "submissions" / "smoke.csv"
    labels = Layout(data).test_labels
    run_logged(
        ["ensemble.evaluate", str(submission), "--labels", str(labels)],
        work / "logs" / "evaluate.log",
    )
    return (work / "logs" / "evaluate.log").read_text().strip().splitlines()[-1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.ops.smoke", description=__doc__)
    parser.add_argument("--models", nargs="+", help="default: vipriors16 and effnet_b2_ablation")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "smoke")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument(
        "--center-crop",
        action="store_true",
        help="logits of the centre crop alone, not TenCrop (the suite's: a tenth of the cost)",
    )
    parser.add_argument(
        "--precision",
        choices=["bf16", "native"],
        default="bf16",
        help="native: bf16 where this CPU computes it natively, else fp32 (the suite's choice)",
    )
    return parser.parse_args(argv)


def distinct_first(names: list[str]) -> list[str]:
    """`names` with the first config of each (arch, img_size, test_size) ahead of the others."""
    seen, first, rest = set(), [], []
    for name in names:
        cfg = load_config(name)  # an unknown name fails here, before anything runs
        key = (cfg["arch"], cfg["img_size"], cfg["test_size"])
        (rest if key in seen else first).append(name)
        seen.add(key)
    return first + rest


def choose_precision(asked: str) -> str:
    """The `mixed_precision` of every run, said in one line when the CPU lacks native bf16."""
    if cpu_has_native_bf16():
        return "bf16"
    if asked == "bf16":
        warn(
            "this CPU has no native bf16 (no AVX512-BF16 or AMX, or ONEDNN_MAX_CPU_ISA caps it): "
            "bf16 is emulated, about 9x slower than fp32; --precision native trains in fp32"
        )
        return "bf16"
    print("smoke: no native bf16 on this CPU: training in fp32 (--precision native)", flush=True)
    return "no"


@cli_main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    precision = choose_precision(args.precision)
    view = "center" if args.center_crop else "tencrop"
    names = distinct_first(args.models or plan_models())
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = build_data(work)
    rows = []
    for name in names:
        try:
            rows.append(smoke_model(name, work, data, args.keep, precision, view))
        except SmokeFailure as err:
            raise SystemExit(f"smoke: {name}: {err}") from None
        append_times(work / "times.csv", rows[-1])
        print(f"smoke {name}: ok in {rows[-1]['total_s']:.0f} s", flush=True)
    try:
        evaluation = ensemble_and_evaluate(names, work, data)
    except SmokeFailure as err:
        raise SystemExit(f"smoke: ensemble: {err}") from None
    print(f"\n{format_times(rows)}\n\n{evaluation}")
    print(f"make smoke: {len(rows)} configs in {(time.perf_counter() - started) / 60:.1f} min")
    return rows


if __name__ == "__main__":
    main()

"""`make gpu-check`: the figures the README's GPU section needs, in one run of a few minutes.

Without CUDA it refuses in one line. On a CUDA machine it prints one table:
1. step: EfficientNet-B2 at 320 px (configs/models/effnet_b2_ablation.yaml, its 64 images per
   GPU), bf16, channels-last: images/s of the strong-baseline step (one view, CE with mixing and
   smoothing) and of the Attract-and-Repulse step (two views, teacher, SCE + CR + MT + auxiliary
   head, EMA), timed as `scripts.bench.train` times them, their ratio (the arithmetic says about
   2.7), and the model TFLOP/s the A&R step achieves (`make plan TFLOPS=` takes it).
2. memory: EfficientNet-B7 at 448 px (effnet_b7, its micro-batch of 16 per GPU): the peak CUDA
   memory allocated by a training step (after one that created the optimiser state), against
   `make plan`'s estimate of the same step; and the caching allocator's peak reservation.
3. loader: the training loader (`train.data.train_loader`: two views of RandomResizedCrop,
   AutoAugment, RandomErasing) on generated JPEGs of ImageNet size with the config's workers:
   images/s, against what the A&R step of (1) consumes.
4. two processes, with two or more GPUs: `python -m train.launch --num_processes 2` (as
   `make train`) on a generated 16-class dataset for one epoch of 8 steps; the run's images/s
   from its metrics.csv against twice the one-GPU step of (1) (the run's figure includes
   loading and the first steps' warm-up).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from timm.optim import create_optimizer_v2

from common.errors import UserError, cli_main
from scripts.bench.loader import make_jpegs
from scripts.bench.train import median_seconds
from scripts.ops import plan
from scripts.stages import ROOT, child_env
from train.config import load_config
from train.data import train_loader
from train.distributed import make_accelerator
from train.engine import AttractRepulseStep
from train.losses import AttractRepulseLoss
from train.model import build_model, build_teacher
from train.rng import generator_for
from train.run import optimizer_kwargs
from train.views import SharedMixup

BASELINE = ["num_views=1", "cr_weight=0", "mt_weight=0", "aux_weight=0", "rce_weight=0"]
GIB = 2**30
B2 = "effnet_b2_ablation"  # the paper's ablation setting: EfficientNet-B2, 320 px, 64 per GPU


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "make gpu-check needs a CUDA GPU and this machine has none visible "
            "(torch.cuda.is_available() is False); run it on a GPU machine"
        )


def random_batch_step(cfg: dict, images: torch.Tensor, labels: torch.Tensor):
    """The training step (train/engine.py) of `cfg`, built as train/run.py builds it, on one
    fixed batch of random images: a closure that runs it once."""
    acc = make_accelerator(cfg["mixed_precision"])
    model = build_model(cfg).to(memory_format=torch.channels_last)
    teacher = build_teacher(model, cfg["ema_decay"], cfg["ema_warmup"])
    optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=cfg["lr"], **optimizer_kwargs(cfg))
    criterion = AttractRepulseLoss.from_config(cfg, model)
    model, optimizer = acc.prepare(model, optimizer)
    teacher.to(acc.device)
    mix = SharedMixup.from_config(cfg)
    step = AttractRepulseStep(acc, model, teacher, optimizer, criterion, mix, channels_last=True)
    batch = (images[:, : cfg["num_views"]], labels, None)
    counter = itertools.count(2)
    return lambda: step(batch, generator_for(0), 1.0, False, next_step=next(counter))


def step_rates(model: str, overrides: list[str], repeat: int) -> dict[str, float]:
    """Images/s of the baseline and the A&R step of `model` at its resolution and batch."""
    cfg = load_config(model, overrides)
    configs = {"baseline": load_config(model, [*overrides, *BASELINE]), "attract_repulse": cfg}
    images = torch.randn(cfg["batch_size"], 2, 3, cfg["img_size"], cfg["img_size"])
    labels = torch.randint(0, cfg["num_classes"], (cfg["batch_size"],))
    rates = {}
    for name, step_cfg in configs.items():
        seconds = median_seconds(
            {name: (random_batch_step(step_cfg, images, labels), None)}, repeat
        )
        rates[name] = cfg["batch_size"] / seconds[name]
        torch.cuda.empty_cache()
    gflops, _ = plan.forward_gflops(cfg)
    rates["tflops"] = rates["attract_repulse"] * cfg["num_views"] * plan.PASSES * gflops / 1e3
    return rates


def peak_memory(model: str) -> dict[str, float]:
    """GiB: the peak allocated and reserved in one step of the config's micro-batch (or of the
    largest the plan fits on this GPU, if smaller), and the plan's estimate of the same step."""
    cfg = load_config(model)
    footprint = plan.footprint(cfg)
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    fits = plan.largest_micro_batch(footprint, plan.usable_bytes(total, footprint.params, 1))
    images = min(cfg["batch_size"], fits)
    if images < 1:
        return {"images": 0, "allocated": 0.0, "reserved": 0.0, "estimate": 0.0}
    state = plan.build_state(cfg, "cuda")
    plan.training_step(state, 1, plan.WARMUP_SIZE, "cuda")  # optimiser state and gradients
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    plan.training_step(state, images, cfg["img_size"], "cuda")
    torch.cuda.synchronize()
    measured = {
        "images": images,
        "allocated": torch.cuda.max_memory_allocated() / GIB,
        "reserved": torch.cuda.max_memory_reserved() / GIB,
        "estimate": footprint.bytes_at(images) / GIB,
    }
    del state
    torch.cuda.empty_cache()
    return measured


def loader_rate(model: str, overrides: list[str], folder: Path, batches: int) -> float:
    """Images/s of the training loader over `batches` batches after the first (worker start)."""
    cfg = load_config(model, overrides)
    items = make_jpegs(folder, cfg["batch_size"] * (batches + 1))
    loader, _, _ = train_loader(cfg, items, rank=0, world=1)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    count = sum(batch[1].shape[0] for batch in iterator)
    return count / (time.perf_counter() - started)


def two_process_rate(model: str, overrides: list[str], folder: Path, per_class: int = 64) -> float:
    """Images/s of a 2-process `train.launch` run of one epoch on 16 classes of `per_class`
    training images, from its metrics.csv."""
    source = folder / "source"
    for label in range(16):
        (source / f"class_{label:02d}").mkdir(parents=True)
        make_jpegs(source / f"class_{label:02d}", per_class + 2, seed=label)
    data, runs = folder / "data", folder / "runs"
    python = [sys.executable, "-m"]
    env = child_env()
    prep = ["data_prep", "folder", "--root", str(source), "--per-class", f"{per_class},1,1"]
    subprocess.run([*python, *prep, "--out", str(data)], env=env, check=True, cwd=ROOT)
    args = [model, *overrides, f"data_dir={data}", f"out_dir={runs}"]
    args += ["num_classes=16", "epochs=1"]
    args += ["warmup_epochs=0", "train_splits=[train]", "ckpt_every_steps=0"]
    launch = [*python, "train.launch", "--num_processes", "2", *args]
    subprocess.run(launch, env=env, check=True, cwd=ROOT)
    return float(pd.read_csv(runs / model / "metrics.csv")["img_per_s"].iloc[-1])


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| check | measured | against |", "|---|--:|---|"]
    lines += [f"| {check} | {value} | {against} |" for check, value, against in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.gpu_check", description=__doc__)
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--loader-batches", type=int, default=8)
    return parser.parse_args(argv)


@cli_main
def main(argv: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    args = parse_args(argv)
    require_cuda()
    started = time.perf_counter()
    gpus = torch.cuda.device_count()
    print(f"gpu-check: {gpus} x {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rates = step_rates(B2, [], args.repeat)
    ratio = rates["baseline"] / rates["attract_repulse"]
    rows: list[tuple[str, str, str]] = [
        ("B2 320 px bf16, strong baseline step", f"{rates['baseline']:.0f} img/s", ""),
        (
            "B2 320 px bf16, A&R step",
            f"{rates['attract_repulse']:.0f} img/s",
            f"{ratio:.2f}x slower than the baseline (arithmetic: 2.7x)",
        ),
        ("B2 A&R model TFLOP/s", f"{rates['tflops']:.1f}", "make plan TFLOPS= for EfficientNets"),
    ]
    memory = peak_memory("effnet_b7")
    label = f"B7 448 px step, {memory['images']} images"
    if memory["images"]:
        rows += [
            (
                f"{label}: peak allocated",
                f"{memory['allocated']:.1f} GiB",
                f"make plan: {memory['estimate']:.1f} GiB "
                f"({memory['estimate'] / memory['allocated'] - 1:+.0%})",
            ),
            (f"{label}: peak reserved", f"{memory['reserved']:.1f} GiB", ""),
        ]
    else:
        rows.append(("B7 448 px step", "not run", "make plan fits no image on this GPU"))
    with tempfile.TemporaryDirectory() as tmp:
        loader = loader_rate(B2, [], Path(tmp), args.loader_batches)
        workers = load_config(B2)["workers"]
        rows.append(
            (
                f"loader, B2 320 px, {workers} workers ({os.cpu_count()} CPUs)",
                f"{loader:.0f} img/s",
                f"the A&R step consumes {rates['attract_repulse']:.0f} img/s",
            )
        )
        if gpus >= 2:
            pair = two_process_rate(B2, [], Path(tmp))
            rows.append(
                (
                    "2 processes, B2 A&R, train.launch",
                    f"{pair:.0f} img/s",
                    f"2 x one GPU's step: {2 * rates['attract_repulse']:.0f} img/s",
                )
            )
        else:
            rows.append(("2 processes", "not run", "one GPU visible"))
    print(
        f"\n{table(rows)}\n\nmeasured {time.strftime('%Y-%m-%d')} in "
        f"{(time.perf_counter() - started) / 60:.1f} min"
    )
    return rows


if __name__ == "__main__":
    main()

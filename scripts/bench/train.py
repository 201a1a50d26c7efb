"""The bare training step with the real training objects, and the CPU levers tried on it.

`train.run.Run` builds the student, the EMA teacher, the optimiser, the loss and the mixing
exactly as `make train` does; one batch of its loader is kept in memory and `Run.step` (the
Algorithm 1 step of train/engine.py) is timed on it again and again: no loader, no evaluation,
no checkpoint. That is the "bare step" the loop-overhead benchmark (bench_loop.py) divides by.

Side by side, interleaved (the machine's speed drifts), medians:
- the strong baseline's step against the Attract-and-Repulse step (same images per step);
- each lever against the default: channels-last, one thread instead of all, bf16 autocast,
  torch.compile (its compile time reported apart: it is paid once per run);
- and, as a different network rather than the same work faster, the demo's quarter-width ResNet-18
  (configs/models/demo_resnet18_w16.yaml), the lever that bought its members their epochs.

    python -m scripts.bench.train [--model demo_resnet18] [--repeat 7] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from statistics import median_high

import torch

from scripts.stages import child_env, run_child
from train.config import load_config
from train.run import Run

NARROW = "demo_resnet18_w16"
BASELINE = ["num_views=1", "rce_weight=0", "cr_weight=0", "mt_weight=0", "aux_weight=0"]


def bare_step(model: str, overrides: list[str], out_dir: str) -> tuple[Callable[[], None], Run]:
    """A closure running one real step on a fixed in-memory batch, and its Run."""
    cfg = load_config(model, [*overrides, "workers=0", f"out_dir={out_dir}"])
    run = Run(cfg)
    batch = next(iter(run.prefetcher))  # uint8 views, on the device: the loop's own handover
    counter = iter(range(2, 1 << 30))  # optimiser steps > 1: timm's EMA really averages

    def step() -> None:  # the loop's micro-step: the device's augmentation, then Algorithm 1
        run.micro = run.global_step = next(counter)
        run.train_step(batch, stop=False, save=False)

    return step, run


@contextlib.contextmanager
def threads(n: int | None):
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_seconds(steps: dict[str, tuple[Callable[[], None], int | None]], repeat: int):
    """Each step's median over `repeat` rounds, the steps interleaved within every round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step, n in steps.values():  # warm-up: allocator, oneDNN primitive caches
        with threads(n):
            step()
    for _ in range(repeat):
        for name, (step, n) in steps.items():
            with threads(n):
                started = time.perf_counter()
                step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
    # The upper median: a timing that was measured, not an average of two.
    return {name: median_high(t) for name, t in times.items()}


def own_process_seconds(
    model: str, overrides: list[str], repeat: int, timeout: float | None = None
) -> dict[str, float]:
    """The first step (compilation, if any, included) and the median step under `overrides`,
    with torch.compile's graph breaks and the times inductor skipped CUDA graphs (it only
    logs them), measured in a fresh process (ended past `timeout` s: `subprocess.TimeoutExpired`):
    Accelerate fixes the precision and the dynamo backend for the process at its first
    Accelerator."""
    code = (
        "import json, tempfile, time; from scripts.bench.train import bare_step, median_seconds\n"
        "from torch._dynamo.utils import counters\n"
        f"d = tempfile.mkdtemp(); step, _ = bare_step({model!r}, {overrides!r}, d)\n"
        "t = time.perf_counter(); step(); first = time.perf_counter() - t\n"
        f"c = median_seconds({{'c': (step, None)}}, {repeat})\n"
        "breaks = sum(counters['graph_break'].values())\n"
        "skips = counters['inductor']['cudagraph_skips']\n"
        "print(json.dumps({'first': first, **c, 'graph_breaks': breaks, 'cudagraph_skips': skips}))"
    )
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    out = run_child([sys.executable, "-c", code], timeout, env=child_env(), **pipes)
    if out.returncode != 0:
        raise SystemExit(f"bench_train: the step with {overrides} failed:\n{out.stderr[-2000:]}")
    for line in reversed(out.stdout.splitlines()):  # the timing, whatever a library printed
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(
        f"bench_train: the step with {overrides} printed no timing:\n{out.stdout[-2000:]}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo_resnet18")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        default, run = bare_step(args.model, [], out)
        steps = {
            "attract_repulse (default)": (default, None),
            "strong baseline": (bare_step(args.model, BASELINE, out)[0], None),
            "channels_last=true": (bare_step(args.model, ["channels_last=true"], out)[0], None),
            "1 thread": (default, 1),
            # a different network, not the same work faster: the demo's quarter-width member
            f"quarter width ({NARROW})": (bare_step(NARROW, [], out)[0], None),
        }
        seconds = median_seconds(steps, args.repeat)
    # bf16 autocast: oneDNN's bf16 kernels where the CPU has them (avx512_bf16 or AMX), an
    # emulation slower than fp32 where it has not; a different arithmetic, so not a default.
    seconds["mixed_precision=bf16 (own process)"] = own_process_seconds(
        args.model, ["mixed_precision=bf16"], args.repeat
    )["c"]
    compiled = (
        own_process_seconds(args.model, ["compile=true"], args.repeat) if args.compile else None
    )
    if compiled is not None:
        seconds["compile=true (own process)"] = compiled["c"]
    cfg = run.cfg
    print(
        f"\n== bare step: {cfg['arch']} at {cfg['img_size']} px, {cfg['batch_size']} images x "
        f"{cfg['num_views']} views, {run.acc.device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeat} =="
    )
    base = seconds["attract_repulse (default)"]
    print(f"{'step':<36}{'ms':>8}{'vs default':>12}")
    for name, value in seconds.items():
        print(f"{name:<36}{1e3 * value:>8.0f}{value / base:>11.2f}x")
    print(f"A&R / strong baseline: {base / seconds['strong baseline']:.2f}")
    if compiled is not None:
        print(f"torch.compile: first step {compiled['first']:.0f} s (compilation, once per run)")


if __name__ == "__main__":
    main()

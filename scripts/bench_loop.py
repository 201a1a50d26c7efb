"""Loop overhead: what a real training epoch costs beyond its bare steps.

The real command (`python -m train.launch <model>`, as `make train` runs it) trains the embedded
benchmark for `--short` and for `--long` epochs; the difference of the two wall times, divided by
the difference in epochs, is one real epoch (start-up, the model build and the final checkpoint
cancel out). The bare step (bench_train.py: the same Run, one in-memory batch, no loader,
evaluation or checkpoint) times the epoch's optimiser steps is the floor. Their ratio is the
loop's overhead: loader, evaluation, checkpoints, logging (target: at most 1.1).

    python -m scripts.bench_loop [--model demo_resnet18] [--short 1] [--long 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench_train import bare_step, median_seconds
from train.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def real_run_seconds(model: str, epochs: int, out_dir: str, overrides: list[str]) -> float:
    """Wall time of the real training command for `epochs` epochs, from scratch."""
    args = [model, f"epochs={epochs}", f"out_dir={out_dir}", f"name=loop{epochs}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "train.launch", *args], env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"bench_loop: python -m train.launch {' '.join(args)} failed")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo_resnet18")
    parser.add_argument("--short", type=int, default=1)
    parser.add_argument("--long", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2, help="real runs of each length")
    parser.add_argument("overrides", nargs="*", help="key=value for both the run and the step")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        walls: dict[int, list[float]] = {args.short: [], args.long: []}
        for _ in range(args.repeat):  # interleaved: the machine's speed drifts
            for epochs in walls:
                folder = tempfile.mkdtemp(dir=out)
                walls[epochs].append(real_run_seconds(args.model, epochs, folder, args.overrides))
        step, run = bare_step(args.model, args.overrides, out)
        bare = median_seconds({"bare": (step, None)}, 2 * run.steps_per_epoch)["bare"]
    short, long = (sorted(walls[e])[len(walls[e]) // 2] for e in (args.short, args.long))
    epoch = (long - short) / (args.long - args.short)
    floor = bare * run.steps_per_epoch
    cfg = load_config(args.model, args.overrides)
    print(
        f"\n== loop overhead: {args.model} ({cfg['arch']}, {cfg['img_size']} px, "
        f"workers={cfg['workers']}), {run.steps_per_epoch} steps an epoch =="
    )
    print(
        f"real command: {args.short} epoch(s) {short:.1f} s, {args.long} epochs {long:.1f} s "
        f"(medians of {args.repeat}) -> one real epoch {epoch:.2f} s"
    )
    print(f"bare step {1e3 * bare:.0f} ms x {run.steps_per_epoch} steps = {floor:.2f} s")
    print(f"loop overhead ratio (real epoch / bare steps): {epoch / floor:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()

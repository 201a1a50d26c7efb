"""Loop overhead: what a real training epoch costs beyond its bare steps.

The real command (`python -m train.launch <model>`, as `make train` runs it) trains the embedded
benchmark for `--short` and for `--long` epochs; the difference of the two wall times, divided by
the difference in epochs, is one real epoch (start-up, the model build and the final checkpoint
cancel out). The bare step (bench_train.py: the same Run, one in-memory batch, no loader,
evaluation or checkpoint) times the epoch's optimiser steps is the floor. Their ratio is the
loop's overhead: loader, evaluation, checkpoints, logging (target: at most 1.1).

    python -m scripts.bench.loop [--model demo_resnet18] [--short 1] [--long 4] [--repeat 2]
                                 [--workers 0 1 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from statistics import median_high

from scripts.bench.train import bare_step, median_seconds
from scripts.stages import ROOT, child_env
from train.config import load_config
from train.data import loader_workers


def real_run_seconds(model: str, epochs: int, out_dir: str, overrides: list[str]) -> float:
    """Wall time of the real training command for `epochs` epochs, from scratch."""
    args = [model, f"epochs={epochs}", f"out_dir={out_dir}", f"name=loop{epochs}", *overrides]
    env = child_env()
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
    parser.add_argument(
        "--workers", type=int, nargs="*", help="loader processes to compare (default: the config's)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value for both the run and the step")
    args = parser.parse_args(argv)
    cfg = load_config(args.model, args.overrides)
    counts = args.workers or [loader_workers(cfg)]
    with tempfile.TemporaryDirectory() as out:
        walls: dict[tuple[int, int], list[float]] = {
            (w, e): [] for w in counts for e in (args.short, args.long)
        }
        for _ in range(args.repeat):  # interleaved: the machine's speed drifts
            for workers, epochs in walls:
                folder = tempfile.mkdtemp(dir=out)
                overrides = [*args.overrides, f"workers={workers}"]
                walls[workers, epochs].append(
                    real_run_seconds(args.model, epochs, folder, overrides)
                )
        step, run = bare_step(args.model, args.overrides, out)
        bare = median_seconds({"bare": (step, None)}, 2 * run.steps_per_epoch)["bare"]
    floor = bare * run.steps_per_epoch
    print(
        f"\n== loop overhead: {args.model} ({cfg['arch']}, {cfg['img_size']} px), "
        f"{run.steps_per_epoch} steps an epoch, real runs of {args.short} and {args.long} epochs, "
        f"medians of {args.repeat} =="
    )
    print(f"bare step {1e3 * bare:.0f} ms x {run.steps_per_epoch} steps = {floor:.2f} s")
    print(f"{'loader workers':<22}{'short s':>9}{'long s':>9}{'epoch s':>9}{'real / bare':>13}")
    for workers in counts:
        short, long = (median_high(walls[workers, e]) for e in (args.short, args.long))
        epoch = (long - short) / (args.long - args.short)
        mark = " (config)" if workers == loader_workers(cfg) else ""
        print(
            f"{f'{workers}{mark}':<22}{short:>9.1f}{long:>9.1f}{epoch:>9.2f}{epoch / floor:>12.2f}x"
        )
    print("loop overhead target: real epoch / bare steps <= 1.1")


if __name__ == "__main__":
    main()

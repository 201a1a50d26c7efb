"""`make chaos`: kill a short training run with SIGKILL at random moments; it must lose nothing.

Builds a tiny dataset (80 training images of the embedded benchmark), trains it once without
interruption, then trains the same run again and kills it `--kills` times with SIGKILL, rerunning
it after each kill (a rerun resumes). The moments are drawn from `--seed`: one while a
checkpoint folder is being written, one during an evaluation, the rest a random time after a
random checkpoint (loading data, a step, a write, an evaluation, or the resume itself). A kill
the run outran (a busy machine makes the reference's pace a poor guide) is tried again from the
run folder as it was before that start, its wait halved each time, at most three times. Then
every checkpoint both runs kept is compared file by file: student and teacher weights, optimiser,
scheduler and loop state, and every process's RNG snapshot, bit for bit; metrics.csv too, timing
aside. Prints "kills survived: N/N" (N/N only when everything matched) and exits 1 otherwise.

`python -m scripts.ops.chaos [--kills 10] [--seed S] [--work DIR]` (DIR keeps both runs to inspect).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from common.processes import children
from scripts.stages import ROOT, child_env
from train.checkpoint import load_tensors

# 80 training images, batch 8 as 2 accumulated micro-batches of 4 (so that kills land between
# the micro-batches of a step too): 10 steps an epoch, 20 in all; a checkpoint every 3 steps and
# at each epoch end (after its evaluation), all kept for the comparison.
STEPS, EVERY = 10, 3
EPOCH_ENDS = (STEPS, 2 * STEPS)
CHECKPOINTS = tuple(sorted({*range(EVERY, 2 * STEPS, EVERY), *EPOCH_ENDS}))
# The demo's member (a quarter of ResNet-18's width): resume is the same code at every width, and
# the full width's 130 MB checkpoints made the ten kills take 69 s instead of 37 s (2026-12-07,
# one thread); its 17 MB writes are still met by the checkpoint kill (polled every 2 ms).
MODEL = "demo_resnet18_w16"
RUN = [
    MODEL,
    "epochs=2",
    "batch_size=4",
    "grad_accum=2",
    "workers=1",
    f"ckpt_every_steps={EVERY}",
    "ckpt_every_minutes=0",  # by steps only: the reference and the killed runs must agree
    "keep_last=50",
    "warmup_epochs=1",
    "lr=0.05",
    "train_splits=[train]",
]
TIMING = ("img_per_s",)  # wall-clock figures: the only values two identical runs may differ in
POLL_S = 0.002
TRIES = 3  # starts for one kill, each from the same run folder


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, **kwargs)


def build_data(work: Path) -> Path:
    fashion, tiny = work / "fashion50", work / "tiny"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    python("-m", "data_prep", "fashion", "--out", str(fashion), **quiet)
    root = str(fashion / "train")
    spec = ["--per-class", "8,3,2", "--out", str(tiny)]
    python("-m", "data_prep", "folder", "--root", root, *spec, **quiet)
    return tiny


def start(data: Path, out: Path) -> subprocess.Popen:
    env = child_env()
    args = [*RUN, f"data_dir={data}", f"out_dir={out}"]
    with open(out / "log.txt", "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=log, stderr=log
        )


def sealed(run: Path) -> list[int]:
    done = (run / "checkpoints").glob("step_*/COMPLETE")
    return sorted(int(p.parent.name[5:]) for p in done if p.parent.suffix != ".tmp")


def newest(run: Path) -> int:
    return max(sealed(run), default=0)


def writing(run: Path) -> bool:
    return any((run / "checkpoints").glob("step_*.tmp"))


def wait_until(proc: subprocess.Popen, ready) -> bool:
    """Poll `ready()` until it holds (True) or the run has ended (False)."""
    while proc.poll() is None:
        if ready():
            return True
        time.sleep(POLL_S)
    return False


def reference(data: Path, out: Path) -> float:
    """The uninterrupted run; returns the mean time between its checkpoints."""
    out.mkdir(parents=True)
    proc = start(data, out)
    run, times = out / MODEL, {}
    while proc.poll() is None:
        for step in sealed(run):
            times.setdefault(step, time.monotonic())
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"chaos: the reference run failed; see {out / 'log.txt'}")
    stamps = sorted(times.values())
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)


def schedule(kills: int, rng: random.Random) -> list[tuple[str, int]]:
    """(mode, checkpoint step to wait for), in the order the run will meet them."""
    plan = []
    for mode in ["checkpoint", "evaluation"] + ["random"] * (kills - 2):
        if mode == "evaluation":  # the last checkpoint before an epoch's end
            end = rng.choice(EPOCH_ENDS)
            plan.append((mode, max(step for step in CHECKPOINTS if step < end)))
        elif mode == "checkpoint":  # the next checkpoint write after this one
            plan.append((mode, rng.choice((0, *CHECKPOINTS[:-1]))))
        else:  # a random time after this checkpoint: early enough that the run is still going
            plan.append((mode, rng.choice((0, *CHECKPOINTS[:-2]))))
    return sorted(plan, key=lambda item: item[1])


def kill_once(
    proc: subprocess.Popen, run: Path, mode: str, after: int, gap: float, draw: float
) -> str:
    """Wait for checkpoint `after`, then kill as `mode` says; returns where the kill landed.
    `draw` in [0, 1): where in its window of time a kill in evaluation or at random falls."""
    if not wait_until(proc, lambda: newest(run) >= after):
        return "missed: the run ended first"
    if mode == "checkpoint":
        if not wait_until(proc, lambda: writing(run)):
            return "missed: the run ended first"
    elif mode == "evaluation":
        # The epoch's loader worker, then a new one: the evaluation's (workers=1).
        if not wait_until(proc, lambda: children(proc.pid)):
            return "missed: the run ended first"
        trainer = set(children(proc.pid))
        if not wait_until(proc, lambda: set(children(proc.pid)) - trainer):
            return "missed: the run ended first"
        time.sleep(0.3 * draw)
    else:
        time.sleep(1.5 * gap * draw)
    if proc.poll() is not None:
        return "missed: the run ended first"
    proc.kill()
    proc.wait()
    if writing(run):
        return f"while writing a checkpoint (newest complete: step {newest(run)})"
    where = "in evaluation" if mode == "evaluation" else "at random"
    return f"{where} (newest complete: step {newest(run)})"


def kill_landing(data: Path, out: Path, mode: str, after: int, gap: float, rng) -> str:
    """Start the run and kill it as planned. A run that ends first, cleanly, is put back as it was
    before that start and tried again with its wait halved (the kill then says which try landed);
    one that fails is reported as such, its folder left to inspect."""
    run, before = out / MODEL, out.with_name(out.name + "-before")
    draw = rng.random()  # one a kill: retries leave the later kills' draws as the seed gives them
    try:
        for attempt in range(TRIES):
            shutil.rmtree(before, ignore_errors=True)
            if run.exists():
                shutil.copytree(run, before)
            proc = start(data, out)
            where = kill_once(proc, run, mode, after, gap, draw / 2**attempt)
            if not where.startswith("missed"):
                return where + (f" (try {attempt + 1}: the run outran the kill)" if attempt else "")
            if proc.returncode != 0:
                return f"failed: the run exited {proc.returncode}; see {out / 'log.txt'}"
            shutil.rmtree(run, ignore_errors=True)
            if before.exists():
                before.rename(run)
        return f"{where} {TRIES} times"
    finally:
        shutil.rmtree(before, ignore_errors=True)


def chaos(data: Path, out: Path, kills: int, gap: float, rng: random.Random) -> int:
    """The killed and resumed run; returns how many kills landed before it finished."""
    out.mkdir(parents=True)
    landed = 0
    for i, (mode, after) in enumerate(schedule(kills, rng), start=1):
        where = kill_landing(data, out, mode, after, gap, rng)
        landed += not where.startswith(("missed", "failed"))
        print(f"kill {i}/{kills} ({mode}, after step {after}): {where}", flush=True)
    proc = start(data, out)
    if proc.wait() != 0:
        raise SystemExit(f"chaos: the resumed run failed; see {out / 'log.txt'}")
    return landed


def _state_without_timing(path: Path) -> dict:
    state = load_tensors(path)
    state["config"] = {k: v for k, v in state["config"].items() if k != "out_dir"}
    state["history"] = [{k: row[k] for k in row if k not in TIMING} for row in state["history"]]
    return state


def equal(a, b) -> bool:
    """Nested dicts, lists and tensors compared exactly (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)


def compare(ref: Path, other: Path) -> list[str]:
    """Every difference between two runs' checkpoints and metrics (empty: identical)."""
    problems = []
    ref_ckpt, other_ckpt = ref / "checkpoints", other / "checkpoints"
    names = sorted(p.name for p in ref_ckpt.iterdir() if p.suffix != ".tmp")
    missing = [n for n in names if not (other_ckpt / n / "COMPLETE").is_file()]
    problems += [f"{n}: missing after the kills" for n in missing]
    for name in sorted(set(names) - set(missing)):
        for file in sorted(p.name for p in (ref_ckpt / name).iterdir()):
            a, b = ref_ckpt / name / file, other_ckpt / name / file
            if file.endswith(".safetensors"):
                same = equal(load_file(a), load_file(b))
            elif file == "state.pt":
                same = equal(_state_without_timing(a), _state_without_timing(b))
            elif file.startswith("rng_rank"):
                same = equal(load_tensors(a), load_tensors(b))
            else:
                continue  # COMPLETE: checksums of state.pt, whose timing figures differ
            if not same:
                problems.append(f"{name}/{file} differs")
    a, b = (pd.read_csv(r / "metrics.csv").drop(columns=list(TIMING)) for r in (ref, other))
    if not a.equals(b):
        problems.append("metrics.csv differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.ops.chaos", description=__doc__)
    parser.add_argument("--kills", type=int, default=10, help="at least 2")
    parser.add_argument("--seed", type=int, default=None, help="default: drawn and printed")
    parser.add_argument("--work", type=Path, help="keep the dataset and both runs here")
    args = parser.parse_args(argv)
    if args.kills < 2:
        parser.error("--kills must be at least 2 (one in a checkpoint write, one in evaluation)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(f"chaos: seed {seed} (python -m scripts.ops.chaos --seed {seed} replays the schedule)")
    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty; pass a new folder or delete it")
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    started = time.perf_counter()
    try:
        data = build_data(work)
        gap = reference(data, work / "reference")
        landed = chaos(data, work / "killed", args.kills, gap, random.Random(seed))
        problems = compare(work / "reference" / MODEL, work / "killed" / MODEL)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"chaos: {problem}")
    survived = landed if not problems else 0
    print(f"kills survived: {survived}/{args.kills} ({time.perf_counter() - started:.0f} s)")
    return 0 if survived == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())

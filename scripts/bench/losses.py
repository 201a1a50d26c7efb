"""Benchmark: Contrastive Regularization and its positive mask at 2N = 1,024 views, C = 1,000.

Compares, side by side in one run, the production mask (`positive_mask`: Pinsker pre-filter and
blocked exact Jensen-Shannon) with the brute-force O(N^2 C) mask `jensen_shannon(t, t) <= delta`,
and times the whole CR loss (forward and backward). Each measurement runs in a fresh subprocess
so that its peak memory is its own: peak RSS (`ru_maxrss`) minus the RSS after imports and inputs.
A reference training step (timm efficientnet_b2 forward and backward at 320 px, measured on a
few views and scaled to the same number of views) says what fraction of a step the CR costs.

    python -m scripts.bench.losses [--rows 256 512 1024] [--classes 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from scripts.stages import ROOT, child_env

MB = 1 << 20
# Brute force runs only where its estimated peak fits in this share of the available memory:
# the machine is shared, and at 2N = 1,024, C = 1,000 each [2N, 2N, C] float32 temporary is 4 GB.
MEMORY_SHARE = 0.5
BRUTE_TEMPORARIES = 6  # [2N, 2N, C] tensors alive at once in jensen_shannon, for a first estimate


def _targets(rows: int, classes: int, batch: str, seed: int = 0):
    """Soft targets as the pipeline makes them: smoothing 0.1, Mixup or CutMix, two equal views."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = rows // 2
    if batch == "near_uniform":  # distinct rows all within the pre-filter bound: the worst case
        return (0.01 * torch.randn(n, classes, generator=g)).softmax(-1).repeat(2, 1)
    labels = torch.randint(0, classes, (n,), generator=g)
    y = torch.full((n, classes), 0.1 / classes).scatter_(1, labels[:, None], 0.9 + 0.1 / classes)
    # half the images Mixup-like, half CutMix-like with box areas on a 16x16 grid
    lam = torch.distributions.Beta(0.5, 0.5).sample((n, 1))
    lam[n // 2 :] = 1 - torch.randint(0, 257, (n - n // 2, 1), generator=g) / 256
    return (lam * y + (1 - lam) * y.flip(0)).repeat(2, 1)


def _variant(name: str, rows: int, classes: int, batch: str):
    """A no-argument callable running one variant, its inputs built before the baseline."""
    import torch

    from train.losses import contrastive_regularization, jensen_shannon, positive_mask

    targets = _targets(rows, classes, batch)
    logits = torch.randn(rows, classes, generator=torch.Generator().manual_seed(1))
    if name == "mask":
        return lambda: positive_mask(targets, 0.005)
    if name == "brute_mask":
        return lambda: jensen_shannon(targets, targets) <= 0.005

    def cr_step():
        z = logits.clone().requires_grad_()
        contrastive_regularization(z.softmax(-1), targets).backward()

    return cr_step


def _reference_step(views: int, size: int):
    """Forward and backward of efficientnet_b2 (the paper's ablation model) on `views` images."""
    import timm
    import torch

    model = timm.create_model("efficientnet_b2", num_classes=1000)
    images = torch.randn(views, 3, size, size)

    def step():
        model.zero_grad()
        model(images).logsumexp(-1).mean().backward()

    return step


def child(args: argparse.Namespace) -> None:
    """Run one measurement and print it as a JSON line (seconds, peak RSS delta in MB)."""
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "step":
        run = _reference_step(args.step_views, args.step_size)
    else:
        _variant(args.child, 16, 8, args.batch)()  # load kernels before the baseline
        run = _variant(args.child, args.rows[0], args.classes, args.batch)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # The first call may pay one-off costs (allocator, lazy init): report the fastest.
    print(json.dumps({"seconds": min(times), "peak_mb": (peak_kb - base_kb) * 1024 / MB}))


def measure(
    variant: str, rows: int, args: argparse.Namespace, batch: str = "mixed", repeat: int = 0
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "scripts.bench.losses",
        "--child",
        variant,
        "--rows",
        str(rows),
        "--classes",
        str(args.classes),
        "--threads",
        str(args.threads),
        "--batch",
        batch,
        "--repeat",
        str(repeat or args.repeat),
        "--step-views",
        str(args.step_views),
        "--step-size",
        str(args.step_size),
    ]
    env = child_env()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _row(label: str, result: dict) -> None:
    print(f"  {label:<48} {result['seconds'] * 1e3:>10.1f} ms {result['peak_mb']:>10.1f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024], help="2N")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--step-views", type=int, default=2, help="views the step is timed on")
    parser.add_argument("--step-size", type=int, default=320)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch", default="mixed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    print(f"CR and its positive mask, C = {args.classes}, {args.threads} thread(s), CPU")
    print(f"  {'variant':<48} {'time':>13} {'peak RSS':>13}")
    step = measure("step", 0, args)
    per_view = step["seconds"] / args.step_views
    brute_seen = None  # (2N, peak MB) of the last brute-force run, to estimate the next one
    for rows in sorted(args.rows):
        print(f"2N = {rows}")
        mask, cr = measure("mask", rows, args), measure("cr", rows, args)
        worst = measure("mask", rows, args, batch="near_uniform", repeat=1)
        _row("production mask (Mixup/CutMix batch)", mask)
        _row("production mask (near-uniform rows: worst case)", worst)
        _row("CR loss forward + backward (production mask)", cr)
        need = BRUTE_TEMPORARIES * rows * rows * args.classes * 4 / MB
        if brute_seen:
            need = brute_seen[1] * (rows / brute_seen[0]) ** 2
        if need > MEMORY_SHARE * available_mb():
            print(
                f"  brute-force mask: skipped, needs ~{need / 1024:.1f} GB of "
                f"{available_mb() / 1024:.1f} GB available"
            )
        else:
            brute = measure("brute_mask", rows, args, repeat=1)
            _row("brute-force mask jensen_shannon(t, t) <= delta", brute)
            print(
                f"  brute / production: time x{brute['seconds'] / mask['seconds']:.1f}, "
                f"memory x{brute['peak_mb'] / max(mask['peak_mb'], 0.1):.1f}"
            )
            brute_seen = (rows, brute["peak_mb"])
        print(
            f"  CR / reference step ({rows} views of efficientnet_b2 at {args.step_size} px, "
            f"{per_view * rows:.0f} s): {cr['seconds'] / (per_view * rows):.2%}"
        )


if __name__ == "__main__":
    main()

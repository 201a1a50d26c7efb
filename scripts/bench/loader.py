"""Benchmark: two views per image from one decode, against decoding the image once per view.

Builds a folder of real JPEGs (smooth random content, 320-500 px a side, quality 90) in a
temporary directory and loads two views of every image with the ImageNet training transform at
320 px (RandomResizedCrop, flip, AutoAugment `original`, normalisation, RandomErasing; configs/
base.yaml), on one core, both ways interleaved image by image (each figure sums every image's
best time over the passes, which drops the spikes of a shared machine):

- decode once: `MultiViewDataset(num_views=2)`, the pipeline's loader;
- decode twice: two single-view loads (`MultiViewDataset(num_views=1)` with two seeds).

It prints views per second per core for each, their ratio, and the time of one decode and of one
view's transform, which explain the ratio.

    python -m scripts.bench.loader [--images 200] [--repeats 3] [--img-size 320]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.yamlio import load_yaml
from scripts.stages import ROOT
from train.views import MultiViewDataset, WorkerViews, build_train_transform, load_rgb


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[tuple[str, Path, int]]:
    """`count` JPEGs of 320-500 px a side: a coarse random colour field upsampled, plus noise."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        width, height = (int(v) for v in rng.integers(320, 501, size=2))
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noise = rng.normal(0, 12, field.shape)
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
        path = folder / f"img_{i}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        items.append((path.name, path, i % 10))
    return items


def seconds(fn: Callable[[int], object], index: int) -> float:
    start = time.perf_counter()
    fn(index)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="per-image best of this many passes")
    parser.add_argument("--img-size", type=int, default=320)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per core: one process, one thread, as one loader worker

    cfg = load_yaml((ROOT / "configs" / "base.yaml").read_text())
    cfg["img_size"] = args.img_size
    # What a loader worker does: the PIL half, to uint8 views and erasing draws (the device
    # finishes them, train/views.py).
    transform = WorkerViews(build_train_transform(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        items = make_jpegs(Path(tmp), args.images)
        once = MultiViewDataset(items, transform, num_views=2, seed=0)
        twice = [MultiViewDataset(items, transform, num_views=1, seed=s) for s in (0, 1)]
        images = [load_rgb(path) for _, path, _ in items]
        n = len(items)
        work = {
            "once": lambda i: once[i],
            "twice": lambda i: (twice[0][i], twice[1][i]),
            "decode": lambda i: load_rgb(items[i][1]),
            "transform": lambda i: transform(images[i]),
        }
        times = {k: np.full((args.repeats, n), np.inf) for k in work}
        # Interleaved image by image, and each image's work is the same in every pass (the views
        # are seeded), so the per-image minimum over passes drops the other tenants' spikes.
        for r in range(args.repeats):
            for i in range(n):
                for name, fn in work.items():
                    times[name][r, i] = seconds(fn, i)
    best = {k: float(v.min(0).sum()) for k, v in times.items()}
    once_rate, twice_rate = 2 * n / best["once"], 2 * n / best["twice"]
    print(
        f"loader: {n} JPEGs of 320-500 px, {args.img_size} px views, AutoAugment original, "
        f"1 thread, per-image best of {args.repeats} passes"
    )
    print(f"  decode once, two views:   {once_rate:8.1f} views/s per core")
    print(f"  decode twice (2 x 1 view): {twice_rate:7.1f} views/s per core")
    print(f"  ratio once / twice:       {once_rate / twice_rate:8.2f}x")
    print(
        f"  one decode {1e3 * best['decode'] / n:.2f} ms, "
        f"one view's transform {1e3 * best['transform'] / n:.2f} ms"
    )


if __name__ == "__main__":
    main()

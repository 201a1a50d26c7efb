"""`make bench-data`: how fast `make data` places files, hard links against copies.

Synthesises an ImageNet-shaped tree of tiny files (1,000 classes of 50 train + 50 val images in
`train/<wnid>/`, and 50,000 flat `val/` images for the test split: 150,000 files), then builds
it twice through the imagenet source's own code (`imagenet.make_plan` and `build.build`: file
checks, placement on the thread pool, labels, scan, manifest), once with `--mode link` and once
with `--mode copy`, and prints files per second for each and their ratio, measured in one run.
The files are tiny on purpose: the figure is the per-file cost (syscalls, fsync, bookkeeping),
which is what dominates for ImageNet's ~110 kB JPEGs as well, apart from copy's data volume.
`--files N` runs a smaller tree (N rounded to a multiple of 150) for a quick check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from data_prep.build import build
from data_prep.imagenet import make_plan
from data_prep.place import file_writer
from data_prep.splits import PER_CLASS, Splits

FILES_PER_CLASS = 3 * PER_CLASS  # train + val + test


def _tiny_jpeg() -> bytes:
    """An 8x8 JPEG: `make data` decodes every source image before placing it, so the files
    must be real images; tiny ones keep the benchmark about placement."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(out, "JPEG")
    return out.getvalue()


PAYLOAD = _tiny_jpeg()


def synthesise(root: Path, n_classes: int) -> Splits:
    """Write the tiny-file tree under `root` and return split lists that name every file."""
    wnids = [f"n{i:08d}" for i in range(n_classes)]
    train, val, test = [], [], []
    for wnid in wnids:
        names = [f"{wnid}_{j}.JPEG" for j in range(2 * PER_CLASS)]
        train += [(wnid, n) for n in names[:PER_CLASS]]
        val += [(wnid, n) for n in names[PER_CLASS:]]
        (root / "train" / wnid).mkdir(parents=True)
        for name in names:
            (root / "train" / wnid / name).write_bytes(PAYLOAD)
    (root / "val").mkdir()
    for i in range(n_classes * PER_CLASS):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        test.append((wnids[i % n_classes], name))
        (root / "val" / name).write_bytes(PAYLOAD)
    return Splits(train=train, val=val, test=test)


def measure(files: int, workers: int = 8, base: str | None = None) -> dict[str, float]:
    """Build a synthetic tree of about `files` files in link and in copy mode; timings in s."""
    n_classes = max(1, round(files / FILES_PER_CLASS))
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=base))
    try:
        start = time.perf_counter()
        splits = synthesise(tmp / "imagenet", n_classes)
        result = {"files": n_classes * FILES_PER_CLASS, "synthesise_s": time.perf_counter() - start}
        for mode in ("link", "copy"):
            start = time.perf_counter()
            plan = make_plan(tmp / "imagenet", splits, n_classes, None, mode)
            with contextlib.redirect_stdout(io.StringIO()):  # per-split summaries
                build(tmp / mode, plan, file_writer(mode, None), workers)
            result[f"{mode}_s"] = time.perf_counter() - start
    finally:
        start = time.perf_counter()
        shutil.rmtree(tmp)
    result["cleanup_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.data", description=__doc__)
    parser.add_argument("--files", type=int, default=150_000, help="size of the synthetic tree")
    parser.add_argument("--workers", type=int, default=8, help="placement threads, as make data")
    parser.add_argument("--tmp", help="where to make the tree (default: the system temp folder)")
    args = parser.parse_args(argv)
    r = measure(args.files, args.workers, args.tmp)
    n = r["files"]
    made = r["synthesise_s"]
    print(f"bench-data: {n} files, {args.workers} threads (tree written in {made:.1f} s)")
    for mode in ("link", "copy"):
        print(f"  {mode:5s} {r[f'{mode}_s']:7.1f} s  {n / r[f'{mode}_s']:9.0f} files/s")
    print(f"  link is {r['copy_s'] / r['link_s']:.1f}x faster than copy")
    print(f"  (removing the {3 * n} files took {r['cleanup_s']:.1f} s)")


if __name__ == "__main__":
    main()

"""Benchmark: `make ensemble` at the paper's scale, and TenCrop against ten centre-crop passes.

1. Blend. 16 synthetic logits folders (val and test: 50,000 x 1,000 float16 probabilities each,
   ids, labels, meta.json) are written under a temporary folder in /tmp and deleted afterwards.
   `python -m ensemble.blend` runs in a fresh subprocess, as `make ensemble` runs it; its wall
   time and peak RSS (`ru_maxrss` from wait4) are measured, beside the peak RSS of a process that
   only imports the blend module, and the size of one model's array. Targets: < 30 s, < 1.5 GB.
   The files were just written, so they are read from the page cache: a cold disk adds its
   read time (3.2 GB for 16 models).
2. TenCrop. The same small timm model on the same images, on the CPU, with the same number of
   crops per forward: one TenCrop pass (each image decoded and resized once, its ten crops in
   one batch) against ten separate centre-crop passes (each decodes and resizes every image
   again). Target: TenCrop no slower than the ten passes. Both are repeated, interleaved, and
   the fastest of each is kept, because the machine is shared.

    python -m scripts.bench.ensemble [--models 16] [--rows 50000] [--classes 1000] [--threads 1]
                                     [--search-models N]  (also time --search-weights)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts.stages import ROOT, child_env

MB = 1 << 20


def write_members(root: Path, models: int, rows: int, classes: int) -> list[str]:
    """Synthetic `make logits` folders: random probability rows, ids and labels, meta.json."""
    from ensemble.members import write_npz

    rng = np.random.default_rng(0)
    val_ids = np.array([f"n{i % classes:08d}/n{i % classes:08d}_{i}.JPEG" for i in range(rows)])
    test_ids = np.array([f"img_{i}.JPEG" for i in range(rows)])
    labels = np.arange(rows) % classes
    names = [f"m{j:02d}" for j in range(models)]
    for name in names:
        folder = root / name
        for split, ids in (("val", val_ids), ("test", test_ids)):
            probs = rng.random((rows, classes), dtype=np.float32)
            probs /= probs.sum(1, keepdims=True)
            extra = {"labels": labels} if split == "val" else {}
            write_npz(folder / f"{split}.npz", ids=ids, probs=probs.astype(np.float16), **extra)
        scores = {"images": rows, "trained_on": False, "top1_tencrop": 0.1, "top1_center": 0.1}
        meta = {"heldout_split": "val", "scores": {"val": scores}, "data_dir": None}
        (folder / "meta.json").write_text(json.dumps(meta))
    return names


# Runs a module as `python -m` would (or only imports it, with run_name "import"), then prints
# the process's peak resident memory. VmHWM belongs to the exec'd program alone; getrusage's
# ru_maxrss would also count the parent's pages at fork, which survive exec in that figure.
_PEAK = """
import runpy, sys
run_name, module, *argv = sys.argv[1:]
sys.argv = [module, *argv]
try:
    runpy.run_module(module, run_name=run_name, alter_sys=True)
finally:
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()
    print("peak_kb", status[0], file=sys.stderr)
"""


def run_measured(module: str, args: list[str], run: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `python -m module args` in a fresh process."""
    env = child_env()
    command = [sys.executable, "-c", _PEAK, "__main__" if run else "import", module, *args]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return wall, int(proc.stderr.strip().splitlines()[-1].split()[-1]) / 1024


def bench_blend(models: int, rows: int, classes: int, search: bool = False) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench_ensemble_", dir="/tmp"))
    try:
        start = time.perf_counter()
        names = write_members(root / "logits", models, rows, classes)
        written = time.perf_counter() - start
        blend = [
            "--models",
            *names,
            "--name",
            "bench",
            *(["--search-weights"] if search else []),
            "--logits-dir",
            str(root / "logits"),
            "--out-dir",
            str(root / "submissions"),
        ]
        wall, peak = run_measured("ensemble.blend", blend)
        _, baseline = run_measured("ensemble.blend", [], run=False)
        csv_rows = len((root / "submissions" / "bench.csv").read_text().splitlines()) - 1
        report = json.loads((root / "submissions" / "bench.json").read_text())
    finally:
        shutil.rmtree(root)
    return {
        "write_s": written,
        "blend_s": wall,
        "peak_mb": peak,
        "import_mb": baseline,
        "array_mb": rows * classes * 2 / MB,
        "csv_rows": csv_rows,
        "weights_from": report["weights_from"],
    }


def _images(folder: Path, count: int) -> list[tuple[str, Path, int]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(80, 140, size=2))
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        items.append((f"c/{i}.png", path, 0))
    return items


def bench_tencrop(images: int, size: int, repeats: int) -> dict[str, float]:
    import timm
    from torch.utils.data import DataLoader

    from train.distributed import make_accelerator
    from train.inference import build_crop_transform, predict_crops
    from train.views import EvalDataset

    cfg = {
        "test_size": size,
        "test_resize_ratio": 0.875,
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    accelerator = make_accelerator("no", cpu=True)
    model = timm.create_model("resnet18", num_classes=100).eval()

    def main_only(x):  # the (main, aux) interface of train.model.AuxNet, without an aux head
        return model(x), None

    per_forward = 40  # crops per forward in both variants
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        items = _images(Path(tmp), images)

        def run(view: str, batch: int) -> float:
            loader = DataLoader(EvalDataset(items, build_crop_transform(cfg, view)), batch)
            start = time.perf_counter()
            predict_crops(accelerator, main_only, loader, images, 100, False, False)
            return time.perf_counter() - start

        run("tencrop", per_forward // 10)  # warm-up
        tencrop, ten_passes, one_pass = [], [], []
        for _ in range(repeats):
            tencrop.append(run("tencrop", per_forward // 10))
            passes = [run("center", per_forward) for _ in range(10)]
            ten_passes.append(sum(passes))
            one_pass.append(min(passes))
    return {
        "tencrop_s": min(tencrop),
        "ten_passes_s": min(ten_passes),
        "one_pass_s": min(one_pass),
        "images": images,
        "size": size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--images", type=int, default=64, help="TenCrop: images")
    parser.add_argument("--size", type=int, default=112, help="TenCrop: test_size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--search-models", type=int, default=0, help="also time --search-weights on N models"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    blend = bench_blend(args.models, args.rows, args.classes)
    print(
        f"blend: {args.models} models x {args.rows:,} x {args.classes:,} float16 "
        f"({blend['array_mb']:.0f} MB per array, val and test): wall {blend['blend_s']:.1f} s "
        f"(target < 30), peak RSS {blend['peak_mb']:.0f} MB (target < 1536; the imports alone "
        f"{blend['import_mb']:.0f} MB), {blend['csv_rows']:,} CSV rows; synthetic files written "
        f"in {blend['write_s']:.1f} s"
    )
    if args.search_models:
        search = bench_blend(args.search_models, args.rows, args.classes, search=True)
        print(
            f"blend --search-weights: {args.search_models} models: wall {search['blend_s']:.1f} s, "
            f"peak RSS {search['peak_mb']:.0f} MB; weights: {search['weights_from']}"
        )
    crop = bench_tencrop(args.images, args.size, args.repeats)
    print(
        f"tencrop: resnet18, {crop['images']} images at {crop['size']} px, {args.threads} thread: "
        f"TenCrop {crop['tencrop_s']:.2f} s, ten centre-crop passes {crop['ten_passes_s']:.2f} s, "
        f"ratio {crop['tencrop_s'] / crop['ten_passes_s']:.2f} (target <= 1); one centre-crop "
        f"pass {crop['one_pass_s']:.2f} s (TenCrop / one pass = "
        f"{crop['tencrop_s'] / crop['one_pass_s']:.1f})"
    )


if __name__ == "__main__":
    main()

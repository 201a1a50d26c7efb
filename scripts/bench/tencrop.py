"""TenCrop logits: the plain path against the fast path of `make logits`, on the same images.

Plain: the network as trained (BatchNorm layers separate), contiguous memory, 12 images (120
crops) a forward, as `make logits` ran before (the baseline), and 64 images (640 crops). Fast:
`train.inference.for_inference`, BatchNorm folded into the convolutions (with and without
channels-last), and on the CPU the traced, frozen oneDNN model `make logits` now runs (tracing
time included). Same crops, same averaging: every variant's probabilities are compared with the
baseline's (largest difference, argmax agreement) as well as timed. Runs on the CPU (a GPU
is left alone), on the first `--images` test images of the embedded benchmark (`make data`
first), interleaved, medians.

    python -m scripts.bench.tencrop [--model demo_resnet18] [--images 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median_high

import torch

from data_prep.layout import Layout
from ensemble.logits import images_per_forward
from train.config import load_config
from train.data import eval_loader
from train.distributed import make_accelerator
from train.inference import for_inference, predict_crops
from train.model import build_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo_resnet18")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.model, args.overrides)
    items = Layout(Path(cfg["data_dir"])).test_items()[: args.images]
    acc = make_accelerator("no", cpu=True)
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    size = cfg["test_size"]
    example = torch.zeros(2, 3, size, size)
    before = 12  # `make logits`'s batch when the speed issue timed it: 2 x 64 images / 10 crops
    now = images_per_forward(cfg, "tencrop", torch.device("cpu"))
    variants = {  # name: (model factory, channels_last, images per forward); factory time counts
        f"plain, {before} images (before)": (lambda: plain, False, before),
        "plain, 64 images": (lambda: plain, False, 64),
        f"folded, {now} images": (lambda: for_inference(plain), False, now),
        f"folded + channels-last, {now}": (
            lambda: for_inference(plain).to(memory_format=torch.channels_last),
            True,
            now,
        ),
        f"frozen oneDNN, {before} images": (lambda: for_inference(plain, example), False, before),
        f"frozen oneDNN, {now} (now)": (lambda: for_inference(plain, example), False, now),
    }

    def run(factory, channels_last: bool, batch: int) -> tuple[float, torch.Tensor]:
        loader = eval_loader(cfg, items, 0, 1, batch, "tencrop")
        started = time.perf_counter()
        out = predict_crops(
            acc,
            factory(),
            loader,
            len(items),
            cfg["num_classes"],
            cfg["aux_weight"] > 0,
            False,
            channels_last,
        )
        return time.perf_counter() - started, out["main"]

    times: dict[str, list[float]] = {name: [] for name in variants}
    probs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeat):
        for name, variant in variants.items():
            seconds, probs[name] = run(*variant)
            times[name].append(seconds)
    baseline = next(iter(variants))
    base = probs[baseline]
    plain_s = median_high(times[baseline])
    print(
        f"\n== TenCrop: {cfg['arch']} at {cfg['test_size']} px, {len(items)} images x 10 crops, "
        f"workers={cfg['workers']}, {torch.get_num_threads()} threads, median of {args.repeat} =="
    )
    print(f"{'path':<30}{'s':>7}{'images/s':>10}{'speed-up':>10}{'max |dp|':>11}{'argmax':>9}")
    for name, runs in times.items():
        seconds = median_high(runs)
        diff = (probs[name] - base).abs().max().item()
        same = (probs[name].argmax(1) == base.argmax(1)).float().mean().item()
        print(
            f"{name:<30}{seconds:>7.2f}{len(items) / seconds:>10.0f}{plain_s / seconds:>9.2f}x"
            f"{diff:>11.1e}{100 * same:>8.2f}%"
        )


if __name__ == "__main__":
    main()

"""Step time: the Attract-and-Repulse step against the strong-baseline step, side by side.

Both steps see the same images per step. The baseline runs one view through the student with
CE (+ smoothing, mixing) and steps the optimiser. The Attract-and-Repulse step runs two views
through the student, two through the teacher, the full loss (SCE, CR, MT, auxiliary head), the
optimiser and the EMA update. In arithmetic that is about (2 x 3 + 2 x 1) / 3 = 2.7 times the
baseline (a backward costs about two forwards); the breakdown shows where any excess goes.

`python -m scripts.bench_train [--arch resnet18 --size 32 --batch 64]`; on a CUDA machine it runs
there in bf16 with channels-last (`--arch efficientnet_b2 --size 320` for the paper's setting).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from timm.optim import create_optimizer_v2

from train.config import load_config
from train.engine import two_view_batch
from train.losses import AttractRepulseLoss
from train.model import build_model, build_teacher
from train.rng import generator_for
from train.views import SharedMixup

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeat: int) -> float:
    """Median wall time of `fn()` over `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _autocast():
    """bf16 on CUDA, as training runs there; full precision on the CPU."""
    if DEVICE.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _float(logits: torch.Tensor | None) -> torch.Tensor | None:
    return None if logits is None else logits.float()


class Step:
    """One configured training step on a fixed batch, with its parts timed separately."""

    def __init__(self, cfg: dict, images: torch.Tensor, labels: torch.Tensor):
        torch.manual_seed(0)
        self.cfg, self.views = cfg, cfg["num_views"]
        memory = torch.channels_last if DEVICE.type == "cuda" else torch.contiguous_format
        self.model = build_model(cfg).to(DEVICE, memory_format=memory)
        self.teacher = build_teacher(self.model, 0.999, False) if cfg["mt_weight"] > 0 else None
        self.optimizer = create_optimizer_v2(self.model, opt="sgd", lr=1e-3)
        self.criterion = AttractRepulseLoss.from_config(cfg)
        inputs, targets = two_view_batch(
            images[:, : self.views],
            labels,
            SharedMixup.from_config(cfg),
            generator_for(0),
            DEVICE.type == "cuda",
        )
        self.inputs, self.targets = inputs.to(DEVICE), targets.to(DEVICE)

    def forward_backward(self) -> torch.Tensor:
        with _autocast():
            logits, aux = self.model(self.inputs)
        loss, _ = self.criterion(logits.float(), self.targets, aux_logits=_float(aux))
        loss.backward()
        return loss

    def teacher_forward(self) -> None:
        with torch.no_grad(), _autocast():
            self.teacher.module(self.inputs)

    def losses_only(self) -> None:
        shape = (self.inputs.shape[0], self.cfg["num_classes"])
        logits = torch.randn(shape, device=DEVICE, requires_grad=True)
        teacher = torch.randn_like(logits) if self.teacher is not None else None
        loss, _ = self.criterion(logits, self.targets, aux_logits=logits, teacher_logits=teacher)
        loss.backward()

    def optimizer_and_ema(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        if self.teacher is not None:
            self.teacher.update(self.model, step=100)

    def full(self) -> None:
        self.model.train()
        with _autocast():
            logits, aux = self.model(self.inputs)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad(), _autocast():
                teacher, _ = self.teacher.module(self.inputs)
        loss, _ = self.criterion(
            logits.float(), self.targets, aux_logits=_float(aux), teacher_logits=_float(teacher)
        )
        loss.backward()
        self.optimizer_and_ema()


def measure(arch: str, size: int, batch: int, repeat: int) -> dict[str, dict[str, float]]:
    common = [f"arch={arch}", f"img_size={size}", "drop_path_rate=0.0", "data=fashion50"]
    configs = {
        "baseline": load_config(
            "demo_resnet18",
            [*common, "num_views=1", "cr_weight=0", "mt_weight=0", "aux_weight=0", "rce_weight=0"],
        ),
        "attract_repulse": load_config("demo_resnet18", [*common, "num_views=2"]),
    }
    images = torch.randn(batch, 2, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    steps = {name: Step(cfg, images, labels) for name, cfg in configs.items()}
    results = {name: {} for name in steps}
    # Interleave the two steps part by part: the machine is shared, its speed drifts.
    for part in ("full", "forward_backward", "teacher_forward", "losses_only", "optimizer_and_ema"):
        for name, step in steps.items():
            if part == "teacher_forward" and step.teacher is None:
                continue
            results[name][part] = _timed(getattr(step, part), repeat)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    results = measure(args.arch, args.size, args.batch, args.repeat)
    base, ar = results["baseline"], results["attract_repulse"]
    where = (
        torch.cuda.get_device_name() + ", bf16"
        if DEVICE.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    print(
        f"\n== train step: {args.arch} at {args.size} px, {args.batch} images per step, "
        f"{where} (median of {args.repeat}) =="
    )
    print(f"{'part':<20}{'baseline ms':>14}{'A&R ms':>12}")
    for part in ar:
        print(f"{part:<20}{1e3 * base.get(part, 0.0):>14.1f}{1e3 * ar[part]:>12.1f}")
    print(
        f"ratio A&R / baseline (full step): {ar['full'] / base['full']:.2f} "
        f"(arithmetic estimate 2.7); images/s: baseline {args.batch / base['full']:.0f}, "
        f"A&R {args.batch / ar['full']:.0f}"
    )
    nets = ar["forward_backward"] + ar["teacher_forward"]
    print(
        f"ratio of the network passes alone: {nets / base['forward_backward']:.2f}; "
        f"losses {1e3 * ar['losses_only']:.1f} ms, optimiser+EMA "
        f"{1e3 * ar['optimizer_and_ema']:.1f} ms of {1e3 * ar['full']:.1f} ms"
    )


if __name__ == "__main__":
    main()

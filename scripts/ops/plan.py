"""`make plan [GPU_MEM=80] [GPUS=8] [TFLOPS=...]`: what every real config needs on GPUs, computed
on the CPU without one.

For each model of the paper's ensemble (configs/ensembles/vipriors16.yaml) and the ablation config:
- parameters of the student (backbone and auxiliary head);
- forward GFLOPs per image at the training resolution, counted by `torch.utils.flop_counter`
  (2 FLOPs per multiply-add; convolutions and matrix products, not normalisation or activations);
- training memory: the peak bytes of live tensor storages during one training step (student
  forward and backward on two views under bf16 autocast, with Mean Teacher the teacher's forward
  on both, the RMSprop step, the EMA update), with the optimiser state and accumulated gradients
  present (the steady state of a run with grad_accum > 1). Every tensor is a FakeTensor
  (`FakeTensorMode`): shapes and dtypes without memory or arithmetic, so B7 at 448 px costs
  seconds. Two micro-batch sizes give a line,
  fixed + micro-batch x per image; tests/test_plan.py checks it against a measured CPU peak;
- the largest micro-batch that fits GPU_MEM with a margin, and the grad_accum that keeps the
  config's global batch (its per-GPU batch_size on the paper's 8 GPUs, or lr_base_batch for
  `batch_size: auto`; the lr is tied to it), with even micro-batches (mixing pairs images);
- hours per model: epochs x training images x 8 forward-equivalents (student forward + backward
  = 3, teacher forward = 1, on two views) x forward FLOPs / (GPUS x throughput). The throughput is
  an assumption: by default the model FLOP/s that timm's published training benchmark shows for
  the family (EfficientNet or ResNet, RTX 3090, AMP, channels-last), or TFLOPS= (for instance
  the figure `make gpu-check` measures on your GPU).
"""

from __future__ import annotations

import argparse
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError, cli_main
from ensemble.blend import load_ensemble_config
from train.config import available, load_config
from train.losses import AttractRepulseLoss
from train.model import build_model
from train.run import optimizer_kwargs
from train.views import SharedMixup

GIB = 2**30
PAPER_GPUS = 8  # the paper's machine: a config's batch_size is per GPU of eight
# Usable share of a GPU's memory, and what stays outside the tensors the step allocates: the CUDA
# context, cuDNN/cuBLAS workspaces and the caching allocator's fragmentation.
MEMORY_SHARE = 0.9
RESERVED_BYTES = 2 * GIB
# Forward-equivalents per image and view: the student's forward and backward (about 1 + 2), and
# the teacher's forward where Mean Teacher is on (train/engine.py runs it only then).
STUDENT_PASSES = 3


def passes(cfg: dict[str, Any]) -> int:
    return STUDENT_PASSES + (cfg["mt_weight"] > 0)


# timm's results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv: training images/s (forward and
# backward) of a family's reference model at its benchmark resolution. Depthwise convolutions are
# memory-bound, so EfficientNets reach several times fewer FLOP/s than ResNets.
REFERENCE_THROUGHPUT = {
    "efficientnet": ("efficientnet_b2", 256, 978.68),
    "resnet": ("resnet101", 224, 747.89),
}
IMAGES_PER_CLASS = 50  # the VIPriors subset: 50 train and 50 val images per class
# The config keys that decide a footprint: configs that agree on them share one measurement.
FOOTPRINT_KEYS = (
    "arch",
    "img_size",
    "num_classes",
    "num_views",
    "aux_weight",
    "aux_stage",
    "mt_weight",
    "arch_kwargs",
    "cr_space",
    "cr_proj_dim",
    "opt",
    "drop_rate",
    "drop_path_rate",
)


def plan_models() -> list[str]:
    """The paper's 16 ensemble members, the ablation's EfficientNet-B2 and Table 1's rows."""
    table1 = [m for m in available("models") if m.startswith("table1_")]
    return [*load_ensemble_config("vipriors16")["models"], "effnet_b2_ablation", *table1]


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that ops create (and of those `track`ed).

    A storage counts from the first time it is seen until it is garbage collected, so views and
    in-place results are not counted twice. Works on FakeTensors, whose storages have sizes but
    no memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self._sizes: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


@dataclass
class TrainingState:
    """Student, teacher, optimiser and criterion of a run, as `train.run` builds them."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    criterion: AttractRepulseLoss
    cfg: dict[str, Any]

    def tensors(self) -> list[torch.Tensor]:
        """Everything that persists between steps: weights, buffers, gradients, optimiser state."""
        out = [*self.student.parameters(), *self.student.buffers()]
        out += [*self.teacher.parameters(), *self.teacher.buffers()]
        out += [p.grad for p in self.student.parameters() if p.grad is not None]
        for slots in self.optimizer.state.values():
            out += [v for v in slots.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return out


def model_on(cfg: dict[str, Any], device: str) -> nn.Module:
    """`build_model` on `device`, or on FakeTensors inside FakeTensorMode: built on the meta
    device, then given fake storage there, since some timm models compute settings from tensors
    while they are built (Swin's drop-path rates: `torch.linspace(...).item()`), which a
    FakeTensor cannot answer."""
    if detect_fake_mode() is None:
        with torch.device(device):
            return build_model(cfg)
    with unset_fake_temporarily(), torch.device("meta"):
        model = build_model(cfg)
    # Module.to_empty's own walk, with a factory instead of empty_like: FakeTensorMode refuses
    # the meta tensors as inputs, but makes fake ones from shapes.
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def build_state(cfg: dict[str, Any], device: str = "cpu") -> TrainingState:
    """The run's modules. The teacher is a second model rather than timm's ModelEmaV3 (a deep
    copy, which FakeTensors do not support): the same tensors. Contrastive Regularization is left
    out: its positive mask is data-dependent, and its [2N, 2N] and [2N, C] temporaries are small."""
    student = model_on(cfg, device)
    teacher = model_on(cfg, device).requires_grad_(False)
    optimizer = create_optimizer_v2(student, opt=cfg["opt"], lr=cfg["lr"], **optimizer_kwargs(cfg))
    criterion = AttractRepulseLoss.from_config({**cfg, "cr_weight": 0.0})
    return TrainingState(student, teacher, optimizer, criterion, cfg)


def training_step(state: TrainingState, images: int, size: int, device: str = "cpu") -> None:
    """One step as `train.engine.AttractRepulseStep` takes it: bf16 autocast forward of
    the student and the teacher on `num_views` x `images` views, float32 losses, backward onto
    the gradients already there, the optimiser step, the EMA update of the teacher."""
    cfg = state.cfg
    rows = cfg["num_views"] * images
    inputs = torch.randn(rows, 3, size, size, device=device)
    targets = torch.full((rows, cfg["num_classes"]), 1.0 / cfg["num_classes"], device=device)
    teacher_logits = None
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logits, aux = state.student(inputs)
        if cfg["mt_weight"] > 0:  # as the engine: without MT the teacher's output is unused
            with torch.no_grad():
                teacher_logits = state.teacher(inputs)[0]
    loss, _ = state.criterion(
        logits.float(),
        targets,
        aux_logits=None if aux is None else aux.float(),
        teacher_logits=None if teacher_logits is None else teacher_logits.float(),
    )
    loss.backward()
    state.optimizer.step()
    with torch.no_grad():
        teacher, student = list(state.teacher.parameters()), list(state.student.parameters())
        torch._foreach_lerp_(teacher, student, 1.0 - cfg["ema_decay"])


def step_peak_bytes(cfg: dict[str, Any], images_list: Sequence[int]) -> list[int]:
    """Peak bytes of a steady-state training step of each micro-batch in `images_list`."""
    peaks = []
    with FakeTensorMode():
        state = build_state(cfg)
        # one image first creates the optimiser state and the gradients (at the config's size:
        # some models, Swin among them, take no other)
        training_step(state, 1, cfg["img_size"])
        for images in images_list:
            tracker = StorageTracker()
            for tensor in state.tensors():
                tracker.track(tensor)
            with tracker:
                training_step(state, images, cfg["img_size"])
            peaks.append(tracker.peak)
    return peaks


def forward_gflops(cfg: dict[str, Any]) -> tuple[float, int]:
    """(forward GFLOPs of one image at the training resolution, student parameters)."""
    with FakeTensorMode():
        model = model_on(cfg, "cpu").eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randn(1, 3, cfg["img_size"], cfg["img_size"]))
    return counter.get_total_flops() / 1e9, params


@dataclass
class Footprint:
    params: int
    gflops: float  # forward, one image, training resolution
    fixed_bytes: int  # weights, gradients, optimiser state, teacher
    per_image_bytes: int  # activations of one image's views (student and teacher)

    def bytes_at(self, images: int) -> int:
        return self.fixed_bytes + images * self.per_image_bytes


def footprint(cfg: dict[str, Any]) -> Footprint:
    """Parameters, FLOPs and the memory line from the peaks at micro-batches 1 and 2."""
    gflops, params = forward_gflops(cfg)
    one, two = step_peak_bytes(cfg, [1, 2])
    return Footprint(params, gflops, fixed_bytes=2 * one - two, per_image_bytes=two - one)


def usable_bytes(gpu_mem_gib: float, params: int, gpus: int) -> int:
    """What a step may allocate on one GPU: the margin off, and DDP's gradient buckets (a float32
    copy of the gradients) with more than one GPU."""
    buckets = 4 * params if gpus > 1 else 0
    return int(gpu_mem_gib * GIB * MEMORY_SHARE) - RESERVED_BYTES - buckets


def largest_micro_batch(fp: Footprint, usable: int) -> int:
    return max(0, (usable - fp.fixed_bytes) // fp.per_image_bytes)


def split_global_batch(
    global_batch: int, gpus: int, fits: int, multiple: int = 1
) -> tuple[int, int]:
    """(micro-batch, grad_accum): the fewest accumulation steps whose micro-batch fits, is a
    multiple of `multiple` (2 with Mixup/CutMix, which mix images in pairs) and keeps
    `global_batch` = micro x gpus x accum exactly; if none does, the largest fitting micro-batch
    and the accumulation that comes closest from above; (0, 0) when none fits."""
    fits -= fits % multiple
    if fits < 1:
        return 0, 0
    for accum in range(1, global_batch + 1):
        micro, rest = divmod(global_batch, gpus * accum)
        if rest == 0 and micro % multiple == 0 and 1 <= micro <= fits:
            return micro, accum
    return fits, math.ceil(global_batch / (gpus * fits))


def training_images(cfg: dict[str, Any]) -> int:
    """Images per epoch on the VIPriors subset: 50 per class per split, minus the holdout."""
    total = IMAGES_PER_CLASS * cfg["num_classes"] * len(cfg["train_splits"])
    if "val" in cfg["train_splits"]:
        total -= cfg["holdout_per_class"] * cfg["num_classes"]
    return total


def family(arch: str) -> str:
    return "efficientnet" if "efficientnet" in arch else "resnet"


def reference_tflops(cfg: dict[str, Any]) -> dict[str, float]:
    """Model TFLOP/s of each family's reference: images/s x 3 (forward + backward) x GFLOPs."""
    out = {}
    for name, (arch, px, images_per_s) in REFERENCE_THROUGHPUT.items():
        reference = {**cfg, "arch": arch, "arch_kwargs": {}, "img_size": px, "aux_weight": 0.0}
        gflops, _ = forward_gflops(reference)
        out[name] = images_per_s * 3 * gflops / 1e3
    return out


def train_hours(cfg: dict[str, Any], gflops: float, gpus: int, tflops: float) -> float:
    flops = cfg["epochs"] * training_images(cfg) * cfg["num_views"] * passes(cfg) * gflops * 1e9
    return flops / (gpus * tflops * 1e12) / 3600


def plan_row(
    cfg: dict[str, Any], fp: Footprint, args: argparse.Namespace, tflops: float
) -> dict[str, Any]:
    global_batch = cfg["lr_base_batch"]  # batch_size: auto trains at the lr's batch
    if cfg["batch_size"] != "auto":
        global_batch = cfg["batch_size"] * PAPER_GPUS * cfg["grad_accum"]
    fits = largest_micro_batch(fp, usable_bytes(args.gpu_mem, fp.params, args.gpus))
    pairs = 2 if SharedMixup.from_config(cfg).enabled else 1
    micro, accum = split_global_batch(global_batch, args.gpus, fits, pairs)
    return {
        "model": cfg["name"],
        "arch": cfg["arch"],
        "px": cfg["img_size"],
        "params_m": fp.params / 1e6,
        "gflops": fp.gflops,
        "fixed_gib": fp.fixed_bytes / GIB,
        "per_image_gib": fp.per_image_bytes / GIB,
        "fits": fits,
        "micro": micro,
        "accum": accum,
        "global": micro * args.gpus * accum,
        "intended": global_batch,
        "tflops": tflops,
        "hours": train_hours(cfg, fp.gflops, args.gpus, tflops),
    }


def format_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"| model | arch | px | params (M) | GFLOPs/img | fixed (GiB) | per image (GiB) | "
        f"fits {args.gpu_mem:g} GiB | micro x GPUs x accum | global | TFLOP/s | hours |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        flag = "" if r["global"] == r["intended"] else f" (not {r['intended']})"
        split = f"{r['micro']} x {args.gpus} x {r['accum']}" if r["micro"] else "does not fit"
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['px']} | {r['params_m']:.1f} | {r['gflops']:.1f} "
            f"| {r['fixed_gib']:.2f} | {r['per_image_gib']:.3f} | {r['fits']} | {split} "
            f"| {r['global']}{flag} | {r['tflops']:.1f} | {r['hours']:.0f} |"
        )
    return "\n".join(lines)


def assumptions(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    members = set(load_ensemble_config("vipriors16")["models"])
    ensemble = [r["hours"] for r in rows if r["model"] in members]
    if args.tflops is None:
        speed = (
            "the model FLOP/s of timm's RTX 3090 training benchmark (AMP, channels-last) for the "
            "family: "
            + ", ".join(
                f"{arch} {n:g} img/s at {px} px" for arch, px, n in REFERENCE_THROUGHPUT.values()
            )
        )
    else:
        speed = f"{args.tflops:g} TFLOP/s of model FLOPs per GPU"
    lines = [
        "Memory: peak of live tensors in one bf16 training step (FakeTensorMode), as fixed + "
        f"micro-batch x per image; usable = {MEMORY_SHARE:.0%} of {args.gpu_mem:g} GiB - "
        f"{RESERVED_BYTES // GIB} GiB (CUDA context, workspaces, fragmentation)"
        + (" - DDP gradient buckets (4 B/parameter)." if args.gpus > 1 else "."),
        "Global batch: the config's batch_size x grad_accum on the paper's 8 GPUs (the lr is "
        "given for it); micro-batches are even (Mixup/CutMix pair images), and smaller ones "
        "than the config's see fewer negatives in CR.",
        f"Hours on {args.gpus} GPUs: epochs x training images x num_views x {STUDENT_PASSES + 1} "
        f"passes ({STUDENT_PASSES} without Mean Teacher) x "
        f"forward FLOPs at {speed}; validation passes left out.",
    ]
    if ensemble:
        lines.append(f"The {len(ensemble)} ensemble members: {sum(ensemble):.0f} hours.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.ops.plan", description=__doc__)
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument(
        "--tflops", type=float, help="model TFLOP/s per GPU (default: timm's RTX 3090 figures)"
    )
    parser.add_argument("--models", nargs="+", help="default: vipriors16 and effnet_b2_ablation")
    parser.add_argument("overrides", nargs="*", help="key=value for every model (img_size=...)")
    args = parser.parse_intermixed_args(argv)
    sizes = [args.gpu_mem, args.gpus] + ([] if args.tflops is None else [args.tflops])
    if args.gpus < 1 or not all(math.isfinite(size) and size > 0 for size in sizes):
        raise UserError(
            "GPU_MEM, GPUS and TFLOPS must be positive numbers (e.g. make plan GPU_MEM=80)"
        )
    if usable_bytes(args.gpu_mem, params=0, gpus=1) <= 0:
        raise UserError(
            f"GPU_MEM={args.gpu_mem:g} GiB leaves no memory to use ({MEMORY_SHARE:.0%} of it, "
            f"less {RESERVED_BYTES / GIB:g} GiB for CUDA): give the GPU's memory in GiB "
            "(e.g. GPU_MEM=80)"
        )
    return args


@cli_main
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    configs = [load_config(name, list(args.overrides)) for name in args.models or plan_models()]
    speeds = reference_tflops(configs[0]) if args.tflops is None else {}
    footprints: dict[tuple, Footprint] = {}
    rows = []
    for cfg in configs:
        key = tuple(str(cfg[k]) for k in FOOTPRINT_KEYS)
        if key not in footprints:
            footprints[key] = footprint(cfg)
        tflops = args.tflops or speeds[family(cfg["arch"])]
        rows.append(plan_row(cfg, footprints[key], args, tflops))
        print(f"{cfg['name']}: measured", flush=True)
    print(f"\n{format_table(rows, args)}\n\n{assumptions(args, rows)}")
    return rows


if __name__ == "__main__":
    main()

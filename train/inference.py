"""Inference over crop views: the centre view (validation during training) and TenCrop with
Auxiliary Fusion per crop (docs/recipe.md 5, the paper's "TenCrop inference"), one prediction loop.

An image is decoded once, its short side resized to floor(test_size / test_resize_ratio) (448 ->
512, as timm's eval transform computes it), normalised, and cut by torchvision's `ten_crop` into
the four corners and the centre of the image and of its mirror image (the paper's PyTorch
TenCrop; with an odd margin its mirrored centre crop sits one pixel off the mirror of the centre
crop, the other four are exact mirrors). Every crop goes through the model; main and auxiliary
logits become softmax probabilities per crop, and the ten are averaged. Fusion
w * aux + (1 - w) * main is linear, so fusing per crop and then averaging equals averaging main
and aux separately and fusing after: keeping the two averages lets the fusion weight be chosen
on val without a second pass. The centre crop (`ten_crop`'s fifth) is the plain centre-crop
prediction of the same pass, the one timm's eval transform would give.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from timm.data.transforms import str_to_interp_mode
from torch.fx.experimental import optimization as fx_optimization
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import functional as F

from common.metrics import top1
from train.distributed import any_process, gather_rows

VIEWS = ("tencrop", "center")
FUSION_GRID = torch.linspace(0, 1, 21)  # fusion weights tried: 0, 0.05, ..., 1
CENTER = 4  # ten_crop order: top-left, top-right, bottom-left, bottom-right, centre; then flipped


def resize_size(cfg: dict[str, Any]) -> int:
    """Short side before cropping: floor(test_size / test_resize_ratio)."""
    return math.floor(cfg["test_size"] / cfg["test_resize_ratio"])


class CropViews:
    """Normalised image [3, H, W] -> [V, 3, s, s]: `ten_crop` (V = 10) or the centre (V = 1)."""

    def __init__(self, size: int, view: str):
        if view not in VIEWS:
            raise ValueError(f"view {view!r} is not one of {VIEWS}")
        self.size, self.view = [size, size], view

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.view == "center":
            return F.center_crop(image, self.size).unsqueeze(0)
        return torch.stack(F.ten_crop(image, self.size))


def build_crop_transform(cfg: dict[str, Any], view: str = "tencrop") -> transforms.Compose:
    """PIL image -> [V, 3, test_size, test_size]; normalised once before cropping (it commutes)."""
    interpolation = str_to_interp_mode(cfg["interpolation"])
    return transforms.Compose(
        [
            transforms.Resize(resize_size(cfg), interpolation=interpolation),
            transforms.ToTensor(),
            transforms.Normalize(mean=cfg["mean"], std=cfg["std"]),
            CropViews(cfg["test_size"], view),
        ]
    )


def for_inference(model: torch.nn.Module, example: torch.Tensor | None = None) -> torch.nn.Module:
    """The same function, cheaper to evaluate. A copy in eval mode with every BatchNorm that
    follows a convolution folded into its weights (torch.fx; a network fx cannot trace stays
    unfolded). Given an `example` input on the CPU, the model is also traced, frozen and handed
    to oneDNN (`torch.jit.optimize_for_inference`: fused convolutions in oneDNN's own layout).
    Outputs differ from the original only by float rounding (tests/test_logits.py compares them).

    Why TorchScript although torch marks it deprecated: on the 2-core CPU it made ResNet-18's
    TenCrop forward 1.5x faster for under a second of tracing, where torch.compile (freezing on)
    was 1.45x after 6 s of compiling, paid again in every `make logits` process
    (scripts/bench/tencrop.py times the paths side by side)."""
    model = model.eval()
    try:
        model = fx_optimization.fuse(model)
    except torch.fx.proxy.TraceError:
        pass
    if example is None or example.device.type != "cpu":
        return model
    return _frozen_for_cpu(model, example)


def _frozen_for_cpu(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """`model` traced on `example` and optimised for oneDNN; `model` itself where tracing fails
    (an output that is not tensors, such as a missing auxiliary head's None)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        try:
            traced = torch.jit.trace(model, example, check_trace=False)
        except (RuntimeError, torch.jit.Error):
            return model
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def crop_probabilities(
    model: torch.nn.Module, crops: torch.Tensor, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax of the main and auxiliary heads per crop, [B, V, K] each (aux None without a head).

    `model(x)` returns `(main_logits, aux_logits or None)`; all B x V crops go in one forward.
    """
    batch, views = crops.shape[:2]
    inputs = crops.flatten(0, 1)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    main, aux = model(inputs)
    main = main.float().softmax(-1).unflatten(0, (batch, views))
    if aux is not None:
        aux = aux.float().softmax(-1).unflatten(0, (batch, views))
    return main, aux


def reduce_crops(
    main: torch.Tensor, aux: torch.Tensor | None, keys: list[str]
) -> dict[str, torch.Tensor]:
    """Per key, [B, K]: the mean over the crops, or for `center_*` keys the centre crop alone
    (the only crop of the centre view)."""
    per_crop = {"main": main, "aux": aux}
    center = CENTER if main.shape[1] > CENTER else 0
    return {
        key: per_crop[key.removeprefix("center_")][:, center]
        if key.startswith("center_")
        else per_crop[key].mean(1)
        for key in keys
    }


def fuse(main: torch.Tensor, aux: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Auxiliary Fusion: w * aux + (1 - w) * main (main alone without an auxiliary head)."""
    return main if aux is None else weight * aux + (1 - weight) * main


def best_fusion(
    main: torch.Tensor, aux: torch.Tensor | None, labels: torch.Tensor
) -> tuple[float, float]:
    """(w, top-1) of `fuse(main, aux, w)`, best on these labels (ties: the smaller w)."""
    if aux is None:
        return 0.0, top1(main, labels)
    scores = [top1(fuse(main, aux, w), labels) for w in FUSION_GRID.tolist()]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return FUSION_GRID[best].item(), scores[best]


def predict_crops(
    accelerator: Accelerator, model: torch.nn.Module, *args: Any, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """`predict_crops_of` for one model (the same arguments after it)."""
    return predict_crops_of(accelerator, [model], *args, **kwargs)[0]


@torch.inference_mode()
def predict_crops_of(
    accelerator: Accelerator,
    models: Sequence[torch.nn.Module],
    loader: DataLoader,
    total: int,
    num_classes: int,
    has_aux: bool,
    keep_center: bool,
    channels_last: bool = False,
    interrupted: Callable[[], bool] | None = None,
) -> list[dict[str, torch.Tensor]] | None:
    """Crop-averaged probabilities of this process's shard, per model, gathered into index
    order on all: one pass over the loader for all of them (each image decoded once).
    `interrupted()` true between batches ends this process's pass early (a stop request); when
    it is true on any process at the end, all return None together, gathering nothing.

    The loader yields `(crops [B, V, 3, s, s], label, index)`. Returns "main" and, with an
    auxiliary head, "aux" (each the mean over the V crops) and, with `keep_center`,
    "center_main" (and "center_aux"): the centre crop alone (the only crop of the centre view).
    Every process joins every gather, also one whose shard is empty.
    """
    keys = ["main", "aux"] if has_aux else ["main"]
    keys += [f"center_{k}" for k in keys] if keep_center else []
    rows = [{k: [torch.zeros(0, num_classes)] for k in keys} for _ in models]
    indices = [torch.zeros(0, dtype=torch.long)]
    for crops, _, index in loader:
        # Not before the first batch: a DDP model's first forward after training broadcasts
        # its buffers, a collective that every process must join (later ones do not).
        if interrupted is not None and len(indices) > 1 and interrupted():
            break
        crops = crops.to(accelerator.device)
        for model, model_rows in zip(models, rows, strict=True):
            with accelerator.autocast():
                main, aux = crop_probabilities(model, crops, channels_last)
            if has_aux and aux is None:
                raise RuntimeError("aux_weight > 0 but the model returned no auxiliary logits")
            for key, reduced in reduce_crops(main, aux, keys).items():
                model_rows[key].append(reduced.cpu())
        indices.append(index)
    if interrupted is not None and any_process(accelerator, interrupted()):
        return None
    index = torch.cat(indices)
    return [
        {k: gather_rows(accelerator, index, torch.cat(found[k]), total) for k in keys}
        for found in rows
    ]

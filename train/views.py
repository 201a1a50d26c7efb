"""Two augmented views per image and the Mixup/CutMix that both views share (docs/recipe.md 2).

The Strong Baseline's transform is timm's ImageNet training pipeline (RandomResizedCrop, flip,
AutoAugment, normalisation, RandomErasing), every knob from the config. `MultiViewDataset`
decodes each image once and applies that transform `num_views` times, independently.
`SharedMixup` then mixes every view with ONE partner pairing, ONE lambda and ONE CutMix box, so
that the views of an image carry identical soft targets (timm's `Mixup` on a batch holding both
views would mix view 1 with view 2). The mixing follows timm's `timm/data/mixup.py` (Beta lambda,
square box, lambda corrected to the clipped box area), drawing from a passed generator instead of
numpy's global state.

Randomness is a pure function of its keys (train/rng.py): (seed, epoch, index, rank) for the
augmentation of an image, (seed, epoch, step, rank) for the mixing of a batch, so that a resumed
run replays it whatever worker or process does the work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.mixup import one_hot
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor
from torch.utils.data import Dataset
from torchvision.transforms import Compose, Normalize, ToTensor

from common.errors import UserError
from common.images import to_rgb, unreadable
from train.rng import seeded_global_rngs, stable_seed

Transform = Callable[[Image.Image], torch.Tensor]
# The steps of timm's training pipeline that run on the training device (DeviceAugment).
DEVICE_STEPS = (MaybeToTensor, ToTensor, Normalize, RandomErasing)


def build_train_transform(cfg: dict[str, Any]) -> Transform:
    """The Strong Baseline: RRC, flip, AutoAugment, to tensor, normalise, RandomErasing."""
    try:
        return _create_train_transform(cfg)
    except (AssertionError, KeyError, ValueError) as err:
        # timm asserts deep inside its policy parser: the policy is to blame where the same
        # transform builds without it.
        if cfg["auto_augment"] is None:
            raise
        _create_train_transform({**cfg, "auto_augment": None})
        raise UserError(
            f"auto_augment={cfg['auto_augment']!r} is not a policy timm knows "
            f"({type(err).__name__}: {err}); use original (the recipe's), v0, "
            "rand-m9-mstd0.5-inc1, augmix-m5 or null"
        ) from None


def _create_train_transform(cfg: dict[str, Any]) -> Transform:
    return create_transform(
        input_size=cfg["img_size"],
        is_training=True,
        scale=tuple(cfg["rrc_scale"]),
        ratio=tuple(cfg["rrc_ratio"]),
        hflip=cfg["hflip"],
        color_jitter=None,  # the recipe has no colour jitter (timm also drops it under AutoAugment)
        auto_augment=cfg["auto_augment"],
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        re_prob=cfg["reprob"],
        re_mode=cfg["remode"],
    )


class ViewBatch(NamedTuple):
    """What a loader worker ships for one image's views (collated: a leading batch dimension).

    The worker runs the PIL half of `build_train_transform` (crop, flip, AutoAugment) and draws
    RandomErasing's box; the training device runs the tensor half (`DeviceAugment`): to float,
    normalise, erase. uint8 is a quarter of float32's bytes to pin and copy, and the per-pixel
    work runs where the model runs (timm's PrefetchLoader does the same).
    """

    pixels: torch.Tensor  # [V, C, H, W] uint8
    erase: torch.Tensor  # [V, 4] int64: top, left, height, width; height 0 = not erased
    noise_state: torch.Tensor  # [V, S] uint8: torch's CPU generator state before the noise


class _PasteRecorder:
    """Stands in for the image in timm's `RandomErasing._erase`: keeps where it pastes, so that
    the box comes from timm's own draws (Python's `random`) and its noise draw advances torch's
    generator exactly as before; the noise itself is dropped (the device makes its own)."""

    box = (0, 0, 0, 0)

    def __setitem__(self, key, value) -> None:
        _, rows, cols = key
        self.box = (rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start)


class WorkerViews:
    """The worker's half of `build_train_transform(cfg)`: PIL image -> (uint8 view [C, H, W],
    erase box [4], generator state [S]), drawing from the same generators in the same order."""

    def __init__(self, full: Compose):
        steps = full.transforms
        self.pil = Compose([t for t in steps if not isinstance(t, DEVICE_STEPS)])
        self.erasing = next((t for t in steps if isinstance(t, RandomErasing)), None)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.array(self.pil(image), dtype=np.uint8, copy=True))
        pixels = pixels.permute(2, 0, 1).contiguous()  # as torchvision's to_tensor lays it out
        state = torch.get_rng_state()  # the noise would be drawn from here on
        recorder = _PasteRecorder()
        if self.erasing is not None:
            self.erasing._erase(recorder, *pixels.shape, torch.float32)
        return pixels, torch.tensor(recorder.box), state


class DeviceAugment:
    """The device's half of `build_train_transform`: uint8 views -> float, normalised, erased.

    On the CPU every value equals the one-process pipeline's bit for bit (the same float ops,
    the noise drawn from the worker's generator state). On a GPU the noise comes from a CUDA
    generator seeded per step (`noise`), so erased pixels differ from a CPU run's; everything
    else equals it up to float rounding.
    """

    def __init__(self, full: Compose):
        steps = full.transforms
        norm = next(t for t in steps if isinstance(t, Normalize))
        self.mean, self.std = tuple(norm.mean), tuple(norm.std)
        erasing = next((t for t in steps if isinstance(t, RandomErasing)), None)
        self.per_pixel = erasing is not None and erasing.per_pixel
        self.rand_color = erasing is not None and erasing.rand_color

    def __call__(self, views: ViewBatch, noise: torch.Generator | None = None) -> torch.Tensor:
        """views (pixels on the device; erase and noise_state on the host) -> [N, V, C, H, W]."""
        pixels = views.pixels
        mean, std = self._constants(pixels.device)
        out = pixels.to(torch.float32).div(255).sub_(mean).div_(std)
        chan = out.shape[2]
        for (n, v), (top, left, h, w) in zip(
            np.ndindex(*views.erase.shape[:2]), views.erase.view(-1, 4).tolist(), strict=True
        ):
            if h:
                size = (chan, h, w) if self.per_pixel else (chan, 1, 1)
                out[n, v, :, top : top + h, left : left + w] = self._noise(
                    size, views.noise_state[n, v], noise, out.device
                )
        return out

    @functools.cache  # noqa: B019 (one instance per run; a new tensor per step would copy)
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as [C, 1, 1] float32 on `device`, as torchvision's Normalize makes them."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return mean.to(device), std.to(device)

    def _noise(self, size, state, noise, device) -> torch.Tensor:
        if not (self.per_pixel or self.rand_color):
            return torch.zeros(size, device=device)
        if device.type == "cpu":  # the draw the one-process pipeline made, from its state
            # clone: set_state reads a view of a batch from its storage's start (a crash)
            generator = torch.Generator().set_state(state.clone())
            return torch.empty(size).normal_(generator=generator)
        return torch.empty(size, device=device).normal_(generator=noise)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode any image file (CMYK, grayscale, 16-bit, palette, a PNG named .JPEG) as RGB."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not inside a transform
            return to_rgb(image)
    except unreadable() as err:
        raise UserError(
            f"cannot read image {path} ({err}); replace or remove the file and rerun `make data`"
        ) from None


class MultiViewDataset(Dataset):
    """Items `(id, path, label)` -> (`num_views` views [V, C, H, W], label, index).

    The image is decoded once; the views are independent draws of `transform`, seeded by
    (seed, epoch, index, rank). The epoch lives in shared memory so that `set_epoch` reaches
    DataLoader workers too, persistent ones included (call it before iterating the loader).
    """

    def __init__(
        self,
        items: Sequence[tuple[str, Path, int]],
        transform: Transform,
        num_views: int,
        seed: int,
        rank: int = 0,
    ):
        if num_views < 1:
            raise ValueError(f"num_views={num_views}: need at least one view")
        self.items = list(items)
        self.transform = transform
        self.num_views = num_views
        self.seed = seed
        self.rank = rank
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        _, path, label = self.items[index]
        image = load_rgb(path)
        with seeded_global_rngs(stable_seed(self.seed, self.epoch, index, self.rank)):
            views = [self.transform(image) for _ in range(self.num_views)]
        if isinstance(views[0], tuple):  # WorkerViews: the device finishes them
            return (
                ViewBatch(*(torch.stack(part) for part in zip(*views, strict=True))),
                label,
                index,
            )
        return torch.stack(views), label, index


class EvalDataset(Dataset):
    """Items `(id, path, label)` or `(id, path)` -> (image tensor, label or -1, index)."""

    def __init__(self, items: Sequence[tuple], transform: Transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        item = self.items[index]
        label = item[2] if len(item) > 2 else -1
        return self.transform(load_rgb(item[1])), label, index


@dataclass(frozen=True)
class MixParams:
    """One batch's mixing: image i becomes lam * image i + (1 - lam) * image partner[i]."""

    lam: float
    partner: torch.Tensor  # [N] long; the identity when the batch is not mixed
    box: tuple[int, int, int, int] | None  # CutMix (y0, y1, x0, x1) pasted from the partner


def cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """timm's `rand_bbox` + `cutmix_bbox_and_lam` from `rng`: a box of area ~(1 - lam) H W,
    clipped at the border, and lam corrected to the area actually pasted."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def random_pairing(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random involution without fixed points: images are mixed in pairs (i <-> partner[i]),
    as timm's flip pairs them, so no image is ever mixed with itself."""
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order[0::2]] = order[1::2]
    partner[order[1::2]] = order[0::2]
    return partner


class SharedMixup:
    """Mixup or CutMix with the same pairing, lambda and box for every view; smoothed targets.

    Args:
        mixup_alpha: Beta(alpha, alpha) of Mixup; 0 disables Mixup.
        cutmix_alpha: Beta(alpha, alpha) of CutMix; 0 disables CutMix.
        mix_prob: probability that a batch is mixed at all.
        switch_prob: probability of CutMix rather than Mixup when both are enabled.
        smoothing: label smoothing (off value smoothing / C, on value 1 - smoothing + off).
        num_classes: C.
    """

    def __init__(
        self,
        mixup_alpha: float,
        cutmix_alpha: float,
        mix_prob: float,
        switch_prob: float,
        smoothing: float,
        num_classes: int,
    ):
        for name, value in (
            ("mix_prob", mix_prob),
            ("switch_prob", switch_prob),
            ("smoothing", smoothing),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1]")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha} must be >= 0")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob = mix_prob, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> SharedMixup:
        return cls(
            cfg["mixup_alpha"],
            cfg["cutmix_alpha"],
            cfg["mix_prob"],
            cfg["switch_prob"],
            cfg["smoothing"],
            cfg["num_classes"],
        )

    @property
    def enabled(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> MixParams:
        """This batch's mixing parameters, from exactly one draw of `generator`."""
        if self.enabled and n % 2:
            raise ValueError(
                f"Mixup/CutMix mixes images in pairs: a batch of {n} images is odd; "
                "use an even batch_size and drop the last incomplete batch"
            )
        # One draw seeds a private numpy Generator (torch has no Beta sampler that takes a
        # generator), so the torch stream advances by one value per batch whatever the branch.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        if not self.enabled or rng.random() >= self.mix_prob:
            return MixParams(1.0, torch.arange(n), None)
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or rng.random() < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = torch.from_numpy(random_pairing(n, rng))
        if not use_cutmix:
            return MixParams(lam, partner, None)
        box, lam = cutmix_box(height, width, lam, rng)
        return MixParams(lam, partner, box)

    def targets(self, labels: torch.Tensor, params: MixParams) -> torch.Tensor:
        """Smoothed one-hot targets mixed with the partner's: [N, C], rows summing to 1."""
        off = self.smoothing / self.num_classes
        y = one_hot(labels, self.num_classes, on_value=1.0 - self.smoothing + off, off_value=off)
        partner = params.partner.to(labels.device)
        return y * params.lam + y[partner] * (1.0 - params.lam)

    def __call__(
        self, views: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """views [V, N, C, H, W], labels [N] -> (mixed views [V, N, C, H, W], targets [N, C]).

        An unmixed batch returns `views` itself (not a copy) with smoothed targets. The targets
        are computed where `labels` are (the host, in training), the views mixed where they are.
        """
        if views.ndim != 5 or labels.shape != views.shape[1:2]:
            raise ValueError(
                f"expected views [V, N, C, H, W] and labels [N], got {tuple(views.shape)} "
                f"and {tuple(labels.shape)}"
            )
        params = self.draw(views.shape[1], views.shape[3], views.shape[4], generator)
        return self.apply(views, params), self.targets(labels, params)

    def apply(self, views: torch.Tensor, params: MixParams) -> torch.Tensor:
        """Mix views [V, N, C, H, W] with `params` (on the views' device, without a host read)."""
        if params.lam == 1.0 and params.box is None:
            return views
        partner = to_device(params.partner, views.device)
        if params.box is None:
            return views.mul(params.lam).add_(views[:, partner], alpha=1.0 - params.lam)
        y0, y1, x0, x1 = params.box
        mixed = views.clone()
        mixed[..., y0:y1, x0:x1] = views[:, partner, :, y0:y1, x0:x1]
        return mixed


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A host tensor on `device` without making the host wait: through pinned memory, copied
    asynchronously in stream order (a pageable copy would wait for the queued work). None (no
    CR positives: `cr_weight: 0`, the strong baseline) stays None."""
    if tensor is None or device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)

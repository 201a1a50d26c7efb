"""The network: a timm backbone from scratch, the auxiliary classifier, DSK-ResNeXt101, the teacher.

docs/recipe.md sections 2, 3 and 5. The auxiliary classifier (global average pool, dropout, linear)
reads an intermediate stage chosen through timm's feature API (`feature_info`, and
`forward_intermediates(..., intermediates_only=False)`, which returns the final features and the
intermediate of ONE pass), so the same code serves EfficientNet, ResNet, SE-ResNet and the
selective-kernel ResNeXt. Auxiliary Fusion predicts w * softmax(aux) + (1 - w) * softmax(main).
With `cr_space: features` (the paper's Figure 4(b) comparison, "contrastive learning by features
that add a projector after the backbone") a projector MLP maps the pooled final features to the
L2-normalised embeddings that Contrastive Regularization then contrasts instead of probabilities.
The Mean Teacher is timm's `ModelEmaV3`, which averages parameters and buffers (batch-norm
running statistics included), with Algorithm 1's first update (`MeanTeacher`); the paper gives no
EMA decay, ours is a config key.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import ResNet, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.sknet import SelectiveKernelBottleneck
from timm.utils import ModelEmaV3
from torch import nn

from common.errors import UserError
from train.inference import fuse

# timm's register_model appends the model's name to its module's __all__: declare ours first.
__all__ = ["AuxNet", "build_model", "build_teacher", "ema_decay"]

default_cfgs = generate_default_cfgs(
    {
        "dsk_resnext101_32x4d.untrained": {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 224, 224),
            "pool_size": (7, 7),
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": timm.data.IMAGENET_DEFAULT_MEAN,
            "std": timm.data.IMAGENET_DEFAULT_STD,
            "first_conv": "conv1",
            "classifier": "fc",
        },
    }
)


@register_model
def dsk_resnext101_32x4d(pretrained: bool = False, **kwargs) -> ResNet:
    """Selective-kernel ResNeXt-101 32x4d: an APPROXIMATION of DSK-ResNeXt101.

    DSK-net ("dual selective kernel", Sun et al. 2020) has no public code. This is timm's
    `SelectiveKernelBottleneck` (two kernel branches fused by channel attention, as in
    `skresnext50_32x4d`) on the ResNeXt-101 32x4d layout: layers [3, 4, 23, 3], cardinality 32,
    base width 4. It lacks DSK's second (spatial) selection. Never pretrained.
    """
    if pretrained:
        raise ValueError("dsk_resnext101_32x4d has no pretrained weights; the recipe uses none")
    sk_kwargs = dict(rd_ratio=1 / 16, rd_divisor=32, split_input=False)
    model_args = dict(
        block=SelectiveKernelBottleneck,
        layers=[3, 4, 23, 3],
        cardinality=32,
        base_width=4,
        block_args=dict(sk_kwargs=sk_kwargs),
        zero_init_last=False,
    )
    return build_model_with_cfg(ResNet, "dsk_resnext101_32x4d", False, **dict(model_args, **kwargs))


class AuxNet(nn.Module):
    """A backbone with an optional auxiliary classifier on feature stage `aux_index`, and an
    optional projector for feature-space Contrastive Regularization.

    `forward(x)` returns (main logits, auxiliary logits or None), in train and eval mode alike.
    With a projector, a training-mode forward also keeps the normalised embeddings of its batch
    for `take_embeddings()` (the loss reads them; the step passes it logits only).
    """

    def __init__(
        self,
        backbone: nn.Module,
        aux_index: int | None,
        aux_drop_rate: float,
        proj_dim: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.aux_index = aux_index
        self.aux_feature_info: dict[str, Any] | None = None
        self.aux_head: ClassifierHead | None = None
        if aux_index is not None:
            self.aux_feature_info = {"index": aux_index, **backbone.feature_info[aux_index]}
            self.aux_head = ClassifierHead(
                self.aux_feature_info["num_chs"],
                backbone.num_classes,
                pool_type="avg",
                drop_rate=aux_drop_rate,
            )
        self.projector: nn.Sequential | None = None
        if proj_dim is not None:
            width = backbone.num_features
            # SupCon's "mlp" head (Khosla et al. 2020): Linear, ReLU, Linear to proj_dim.
            self.projector = nn.Sequential(
                nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim)
            )
        self._embeddings: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.aux_head is None and self.projector is None:
            return self.backbone(x), None
        aux = None
        if self.aux_head is None:
            final = self.backbone.forward_features(x)
        else:
            final, (stage,) = self.backbone.forward_intermediates(
                x, indices=[self.aux_index], intermediates_only=False
            )
            aux = self.aux_head(stage)
        if self.projector is not None and self.training:
            pooled = final.mean((2, 3))  # global average pool, before the head's dropout
            self._embeddings = F.normalize(self.projector(pooled), dim=1)
        return self.backbone.forward_head(final), aux

    def take_embeddings(self) -> torch.Tensor:
        """The projector embeddings of the last training-mode forward (once: they hold a graph)."""
        embeddings, self._embeddings = self._embeddings, None
        if embeddings is None:
            raise RuntimeError("take_embeddings needs a training-mode forward with a projector")
        return embeddings

    def predict(self, x: torch.Tensor, fusion_weight: float) -> torch.Tensor:
        """Auxiliary Fusion: w softmax(aux) + (1 - w) softmax(main); main alone without a head."""
        if not 0.0 <= fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight={fusion_weight} must lie in [0, 1]")
        main, aux = self(x)
        aux_probs = None if aux is None else aux.float().softmax(-1)
        return fuse(main.float().softmax(-1), aux_probs, fusion_weight)


def _create_backbone(cfg: dict[str, Any]) -> nn.Module:
    kwargs = dict(pretrained=False, num_classes=cfg["num_classes"], drop_rate=cfg["drop_rate"])
    kwargs.update(cfg["arch_kwargs"] or {})
    if cfg["drop_path_rate"] > 0:
        kwargs["drop_path_rate"] = cfg["drop_path_rate"]
    try:
        return timm.create_model(cfg["arch"], **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise UserError(
            f"arch={cfg['arch']!r} is not a timm model ({err}); pick one from timm.list_models()"
        ) from None
    except TypeError as err:
        if "drop_path_rate" in str(err):
            raise UserError(
                f"arch={cfg['arch']!r} has no stochastic depth; set drop_path_rate=0"
            ) from None
        if cfg["arch_kwargs"]:
            raise UserError(
                f"arch_kwargs={cfg['arch_kwargs']!r} does not fit arch={cfg['arch']!r} ({err}); "
                "see the arguments of its timm model function"
            ) from None
        raise


def _aux_index(backbone: nn.Module, cfg: dict[str, Any]) -> int:
    stages = getattr(backbone, "feature_info", None)
    if not isinstance(stages, list) or not hasattr(backbone, "forward_intermediates"):
        raise UserError(
            f"arch={cfg['arch']!r} lacks timm's feature API (feature_info, forward_intermediates) "
            "that the auxiliary head needs; choose another arch or set aux_weight=0"
        )
    k = cfg["aux_stage"]
    if not -len(stages) <= k < len(stages):
        raise UserError(
            f"aux_stage={k} is out of range: {cfg['arch']} has {len(stages)} feature stages "
            f"({', '.join(s['module'] for s in stages)}); use -{len(stages)}..{len(stages) - 1}"
        )
    return k % len(stages)


def build_model(cfg: dict[str, Any]) -> AuxNet:
    """`cfg["arch"]` from scratch, with the auxiliary head on `aux_stage` if aux_weight > 0 and
    the projector if Contrastive Regularization runs in feature space."""
    backbone = _create_backbone(cfg)
    features = cfg["cr_space"] == "features" and cfg["cr_weight"] > 0
    proj_dim = cfg["cr_proj_dim"] if features else None
    if cfg["aux_weight"] <= 0:
        return AuxNet(backbone, None, 0.0, proj_dim)
    return AuxNet(backbone, _aux_index(backbone, cfg), cfg["aux_drop_rate"], proj_dim)


def use_channels_last(cfg: dict[str, Any], device: torch.device) -> bool:
    """NHWC memory format: the config's choice, or on for CUDA when it is null (convolutions on
    tensor cores want it; on the CPU it depends on the network: `make bench` measures it)."""
    return device.type == "cuda" if cfg["channels_last"] is None else bool(cfg["channels_last"])


def ema_decay(cfg: dict[str, Any], total_steps: int) -> float:
    """The teacher's eta per optimiser step.

    `ema_decay`, or with `ema_horizon` h set, eta = 1 - 1 / (h * total_steps), clamped to [0, 1).
    An EMA with decay eta averages over a time constant of 1 / (1 - eta) steps (the weight of a
    step decays by 1/e after that many), so h is the fraction of the run the teacher remembers.
    """
    horizon = cfg["ema_horizon"]
    if horizon is None:
        eta = cfg["ema_decay"]
        if not 0.0 <= eta < 1.0:
            raise UserError(f"ema_decay={eta} must lie in [0, 1) (our default: 0.9998)")
        return float(eta)
    if horizon <= 0 or total_steps <= 0:
        raise UserError(f"ema_horizon={horizon} must be > 0 (a fraction of the run, e.g. 0.1)")
    return max(0.0, 1.0 - 1.0 / (horizon * total_steps))


class MeanTeacher(ModelEmaV3):
    """timm's EMA with Algorithm 1's first step: without warm-up, theta'_1 = eta theta'_0 +
    (1 - eta) theta_1 (timm's schedule copies the student at the first update, step <= 1)."""

    def get_decay(self, step: int | None = None) -> float:
        return super().get_decay(step if self.use_warmup else None)


def build_teacher(student: nn.Module, decay: float, warmup: bool) -> MeanTeacher:
    """The Mean Teacher: an EMA copy of `student` (parameters AND buffers), never trained.

    Call `teacher.update(student, step)` after each optimiser step, with the number of steps done
    so far. Without `warmup` the decay is `decay` from the first update (the paper's Algorithm
    1); with it, timm's schedule (ours): a copy at step 1, then 1 - step^(-2/3) up to `decay`.
    Pass the unwrapped student (not DDP).
    """
    teacher = MeanTeacher(student, decay=decay, use_warmup=warmup, exclude_buffers=False)
    teacher.requires_grad_(False)
    return teacher

"""The Attract-and-Repulse step and the evaluation pass (the paper's Algorithm 1).

One step: two views of each image, the same Mixup/CutMix on both, the student on both views,
the teacher on both without gradient, L = CE + alpha RCE + beta CR + gamma MT (+ auxiliary
head), an optimiser step, an EMA update of the teacher. The recipe lives in `train/losses.py`;
this file only orders the calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from train.views import generator_for

FUSION_GRID = torch.linspace(0, 1, 21)


@dataclass
class StepResult:
    loss: torch.Tensor  # the total, for backward; non-finite steps are skipped by the caller
    terms: dict[str, float]
    finite: bool


def two_view_batch(batch, mix, generator, channels_last: bool):
    """Views [N, V, C, H, W] -> mixed inputs [V*N, C, H, W] (view-major) and their targets."""
    views, labels, _ = batch
    views, targets = mix(views.transpose(0, 1), labels, generator)
    num_views = views.shape[0]
    inputs = views.flatten(0, 1)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets.repeat(num_views, 1)


def forward_step(
    accelerator, student, teacher, criterion, inputs, targets, mt_scale: float
) -> StepResult:
    logits, aux_logits = student(inputs)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad(), accelerator.autocast():
            teacher_logits, _ = teacher.module(inputs)
    loss, terms = criterion(
        logits.float(),
        targets,
        aux_logits=None if aux_logits is None else aux_logits.float(),
        teacher_logits=None if teacher_logits is None else teacher_logits.float(),
        mt_scale=mt_scale,
    )
    logged = {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}}
    return StepResult(loss, logged, bool(torch.isfinite(loss)))


def step_generator(cfg: dict[str, Any], epoch: int, step: int, rank: int) -> torch.Generator:
    """Mixing randomness of one step: a function of (seed, epoch, step, rank), replayable."""
    return generator_for(cfg["seed"], "mix", epoch, step, rank)


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (probs.argmax(-1) == labels).float().mean().item()


def best_fusion(
    main: torch.Tensor, aux: torch.Tensor | None, labels: torch.Tensor
) -> tuple[float, float]:
    """(w, top-1) of w * aux + (1 - w) * main, best on these labels (ties: the smaller w)."""
    if aux is None:
        return 0.0, top1(main, labels)
    scores = [top1(w * aux + (1 - w) * main, labels) for w in FUSION_GRID.tolist()]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return FUSION_GRID[best].item(), scores[best]

"""Top-1 accuracy, the one definition every stage uses (timm's `timm/utils/metrics.py` role)."""

from __future__ import annotations

from typing import Any


def correct(scores: Any, labels: Any) -> int:
    """Rows whose highest score is the label; numpy arrays or torch tensors alike."""
    return int((scores.argmax(-1) == labels).sum())


def top1(scores: Any, labels: Any) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        raise ValueError("top-1 of zero rows is undefined")
    return 100.0 * correct(scores, labels) / len(labels)

"""Top-1 accuracy, the one definition every stage uses (timm's `timm/utils/metrics.py` role)."""

from __future__ import annotations

from typing import Any


def top1(scores: Any, labels: Any) -> float:
    """Percent of rows whose highest score is the label; numpy arrays or torch tensors alike."""
    if len(labels) == 0:
        raise ValueError("top-1 of zero rows is undefined")
    return 100.0 * float((scores.argmax(-1) == labels).sum()) / len(labels)

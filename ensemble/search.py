"""Ensemble weights searched on val, guarded against fitting val (`make ensemble --search-weights`).

The paper averages its 16 models with equal weights; a search is optional. It is coordinate
ascent from equal weights over a coarse grid (each weight in {0, 0.5, 1, 2}): one model at a
time, the grid value with the best val top-1 is taken only if it beats the current top-1 by at
least `min_gain` points, for at most `max_rounds` passes over the models. Coarse steps and the
minimum gain keep it from chasing a handful of images. The guard is 2-fold cross-validation:
val is split into alternate rows (ids are sorted by class, so both halves hold every class); the
search runs on each half and is scored on the other. Only if the held-out top-1 of the searched
weights beats that of equal weights is the search rerun on all of val and its weights used;
otherwise the weights stay equal, and the report says so.

Memory stays streamed: one member's val probabilities are read at a time (`SplitReader`), beside
the running weighted sum of the rows searched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ensemble.members import Member, SplitReader

GRID = (0.0, 0.5, 1.0, 2.0)
Loader = Callable[[int], np.ndarray]  # member index -> float32 probabilities of the searched rows


def correct(scores: np.ndarray, labels: np.ndarray) -> int:
    return int((scores.argmax(1) == labels).sum())


def percent(scores: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * correct(scores, labels) / len(labels)


def weighted_sum(load: Loader, weights: list[float]) -> np.ndarray:
    total = None
    for j, weight in enumerate(weights):
        probs = load(j)
        probs *= weight
        total = probs if total is None else np.add(total, probs, out=total)
    return total


def coordinate_ascent(
    load: Loader, count: int, labels: np.ndarray, min_gain: float, max_rounds: int
) -> list[float]:
    """Weights from equal ones, one coordinate at a time over GRID (see the module docstring)."""
    weights = [1.0] * count
    total = weighted_sum(load, weights)
    best = percent(total, labels)
    for _ in range(max_rounds):
        moved = False
        for j in range(count):
            probs = load(j)
            rest = total - weights[j] * probs
            others = sum(weights) - weights[j]
            # Ties go to the value nearest 1: the search leans toward equal weights.
            candidates = sorted((g for g in GRID if g > 0 or others > 0), key=lambda g: abs(g - 1))
            scores = {g: percent(rest + g * probs, labels) for g in candidates}
            choice = max(candidates, key=lambda g: scores[g])
            if choice != weights[j] and scores[choice] >= best + min_gain:
                weights[j], best, moved = choice, scores[choice], True
                total = rest + choice * probs
        if not moved:
            break
    return weights


def _loader(reader: SplitReader, members: list[Member], rows: np.ndarray) -> Loader:
    return lambda j: reader.read(members[j])[rows].astype(np.float32)


def search_weights(
    members: list[Member], min_gain: float = 0.1, max_rounds: int = 3
) -> tuple[list[float], dict[str, Any]]:
    """(weights, report): searched weights if they win on held-out halves of val, else equal."""
    reader = SplitReader("val")
    reader.read(members[0])  # fixes the reference ids and labels
    labels, count = reader.labels, len(members)
    folds = [np.arange(len(labels))[k::2] for k in (0, 1)]
    held_out = {"equal": 0, "searched": 0}
    fold_weights = []
    for k, fold in enumerate(folds):
        found = coordinate_ascent(
            _loader(reader, members, fold), count, labels[fold], min_gain, max_rounds
        )
        fold_weights.append(found)
        other = folds[1 - k]
        load_other = _loader(reader, members, other)
        held_out["searched"] += correct(weighted_sum(load_other, found), labels[other])
        held_out["equal"] += correct(weighted_sum(load_other, [1.0] * count), labels[other])
    accepted = held_out["searched"] > held_out["equal"]
    weights = [1.0] * count
    if accepted:
        every = np.arange(len(labels))
        weights = coordinate_ascent(
            _loader(reader, members, every), count, labels, min_gain, max_rounds
        )
    report = {
        "method": "coordinate ascent over a coarse grid, 2-fold cross-validated on val",
        "grid": list(GRID),
        "min_gain": min_gain,
        "max_rounds": max_rounds,
        "fold_weights": fold_weights,
        "held_out_top1_equal": 100.0 * held_out["equal"] / len(labels),
        "held_out_top1_searched": 100.0 * held_out["searched"] / len(labels),
        "accepted": accepted,
    }
    return weights, report

"""Ensemble weights chosen on held-out images, guarded against fitting them
(`make ensemble --search-weights`).

The paper averages its 16 models with equal weights; a search is our option. It runs only on
images that NO member trained on: each member's held-out images (val for a train-split run, the
`holdout_per_class` images of a train+val run: `heldout_split` in its meta.json), intersected
by id. Members that share `holdout_seed` hold out the same images, so the intersection is all of
them. Where a member held out nothing (or the members share no held-out image) there is nothing
to choose on: the weights stay equal and the report says why.

The search is coordinate ascent from equal weights over a coarse grid (each weight in {0, 0.5,
1, 2}): one model at a time, the grid value with the best top-1 is taken only if it beats the
current top-1 by at least `min_gain` points, for at most `max_rounds` passes over the models.
Coarse steps and the minimum gain keep it from chasing a handful of images. The guard is 2-fold
cross-validation: the held-out rows, ordered by class, are split into alternate rows (both
halves hold every class); the search runs on each half and is scored on the other. Only if the
cross-validated top-1 of the searched weights beats that of equal weights is the search rerun on
all the held-out rows and its weights used; otherwise the weights stay equal, and the report
says so.

Memory stays streamed: one member's held-out probabilities are read at a time, beside the
running weighted sum of the rows searched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import UserError
from common.metrics import correct, top1
from ensemble.members import Member, check_rows, read_npz

GRID = (0.0, 0.5, 1.0, 2.0)
Loader = Callable[[int], np.ndarray]  # member index -> float32 probabilities of the searched rows


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
    best = top1(total, labels)
    for _ in range(max_rounds):
        moved = False
        for j in range(count):
            probs = load(j)
            rest = total - weights[j] * probs
            others = sum(weights) - weights[j]
            # Ties go to the value nearest 1: the search leans toward equal weights.
            candidates = sorted((g for g in GRID if g > 0 or others > 0), key=lambda g: abs(g - 1))
            scores = {g: top1(rest + g * probs, labels) for g in candidates}
            choice = max(candidates, key=lambda g: scores[g])
            if choice != weights[j] and scores[choice] >= best + min_gain:
                weights[j], best, moved = choice, scores[choice], True
                total = rest + choice * probs
        if not moved:
            break
    return weights


@dataclass
class HeldOut:
    """The images every member held out: ids ordered by (label, id), their labels, and per
    member the file it was read from and the row of each id in that file."""

    ids: np.ndarray
    labels: np.ndarray
    files: dict[str, str]
    rows: list[np.ndarray]

    def provenance(self) -> dict[str, Any]:
        return {"images": len(self.ids), "files": self.files}


def heldout_split(member: Member) -> str | None:
    """The split of the member's logits that holds the images it did not train on."""
    return member.meta.get("heldout_split")


def positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each of `wanted` (all present) in `ids`."""
    order = np.argsort(ids)
    return order[np.searchsorted(ids, wanted, sorter=order)]


def common_heldout(members: list[Member]) -> HeldOut | str:
    """The images none of the members trained on, or a sentence saying why there are none."""
    blind = [m.name for m in members if heldout_split(m) is None]
    if blind:
        return (
            f"{', '.join(blind)} held out no images (train+val with holdout_per_class 0, or "
            "logits written before held-out images were recorded: rerun `make logits`)"
        )
    files = {m.name: f"{heldout_split(m)}.npz" for m in members}
    arrays = [read_npz(m.folder / files[m.name], ("ids", "labels")) for m in members]
    common = arrays[0]["ids"]
    for member_arrays in arrays[1:]:
        common = np.intersect1d(common, member_arrays["ids"])
    if not len(common):
        return "the members hold out no image in common (give them the same holdout_seed)"
    rows = [positions(a["ids"], common) for a in arrays]
    labels = arrays[0]["labels"][rows[0]]
    for member, member_arrays, row in zip(members, arrays, rows, strict=True):
        if not np.array_equal(member_arrays["labels"][row], labels):
            raise UserError(
                f"{member.folder / files[member.name]}: labels of shared held-out images differ "
                "from the first model's; rerun `make logits` on the same dataset"
            )
    order = np.lexsort((common, labels))
    return HeldOut(common[order], labels[order], files, [r[order] for r in rows])


def heldout_loader(members: list[Member], held: HeldOut, subset: np.ndarray) -> Loader:
    """Member index -> its float32 probabilities of the held-out rows `subset`."""

    checked: set[int] = set()

    def load(j: int) -> np.ndarray:
        member = members[j]
        path = member.folder / held.files[member.name]
        arrays = read_npz(path, ("ids", "probs"))
        if j not in checked:  # once per member, as val.npz and test.npz are checked
            check_rows(path, arrays["ids"], arrays["probs"])
            checked.add(j)
        return arrays["probs"][held.rows[j][subset]].astype(np.float32)

    return load


def search_weights(
    members: list[Member], min_gain: float = 0.1, max_rounds: int = 3
) -> tuple[list[float], dict[str, Any]]:
    """(weights, report): searched weights if they win cross-validated on the held-out images,
    else equal; equal with the reason when the members hold out no image in common."""
    count = len(members)
    held = common_heldout(members)
    if isinstance(held, str):
        return [1.0] * count, {"accepted": False, "skipped": held, "chosen_on": None}
    labels = held.labels
    folds = [np.arange(len(labels))[k::2] for k in (0, 1)]
    held_out = {"equal": 0, "searched": 0}
    fold_weights = []
    for k, fold in enumerate(folds):
        found = coordinate_ascent(
            heldout_loader(members, held, fold), count, labels[fold], min_gain, max_rounds
        )
        fold_weights.append(found)
        other = folds[1 - k]
        load_other = heldout_loader(members, held, other)
        held_out["searched"] += correct(weighted_sum(load_other, found), labels[other])
        held_out["equal"] += correct(weighted_sum(load_other, [1.0] * count), labels[other])
    accepted = held_out["searched"] > held_out["equal"]
    weights = [1.0] * count
    if accepted:
        every = np.arange(len(labels))
        weights = coordinate_ascent(
            heldout_loader(members, held, every), count, labels, min_gain, max_rounds
        )
    report = {
        "method": "coordinate ascent over a coarse grid, 2-fold cross-validated on the images "
        "every member held out",
        "chosen_on": held.provenance(),
        "grid": list(GRID),
        "min_gain": min_gain,
        "max_rounds": max_rounds,
        "fold_weights": fold_weights,
        "cross_validated_top1_equal": 100.0 * held_out["equal"] / len(labels),
        "cross_validated_top1_searched": 100.0 * held_out["searched"] / len(labels),
        "accepted": accepted,
    }
    return weights, report

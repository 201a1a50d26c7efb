"""The artifacts of `make logits`: written, then read back one model at a time, aligned by id.

A member is one model's `logits/<name>/` folder: `meta.json` (written last, so its presence marks a
complete folder), `val.npz` (ids, probs, labels) and `test.npz` (ids, probs). The first member
read fixes a split's reference ids, class count and (val) labels; every later member's rows are
matched to them by id, never by position. Missing, extra or duplicate ids, another class count,
other labels, a non-finite probability or a row that is not a probability distribution (a
negative value, a sum away from 1: logits, or probabilities scaled by hand, would outvote every
other member) are refused with a message naming the file and the row (DESIGN.md: stages align
rows by id, never by position). Before any array is read, the provenance in each meta.json
must agree on the dataset and the test ids (`check_provenance`), and a member whose run has a
newer best checkpoint than the one its logits come from (retrained since) is named in a warning.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import make_command
from common.errors import UserError
from common.fs import atomic_path

SHOWN = 3  # ids named in a mismatch message
# train/checkpoint.py's folder and marker names, repeated so that reading a marker imports no
# torch (`make status` reads them; tests/test_status.py checks them against a real run).
CHECKPOINTS, MARKER = "checkpoints", "COMPLETE"
# float16 keeps 11 significant bits: each stored p is within p * 2^-11 of the softmax output
# (subnormals within 2^-25), so a stored row sums to 1 within 2^-11 + K * 2^-25. 2^-10 allows
# that for up to 2^14 classes and refuses any real departure from a distribution.
SUM_TOLERANCE = 2.0**-10


@dataclass(frozen=True)
class Member:
    """One model's logits folder, its meta.json, and the command that makes them again."""

    name: str
    folder: Path
    meta: dict[str, Any]
    remake: str

    def path(self, split: str) -> Path:
        return self.folder / f"{split}.npz"


def open_members(root: Path, names: list[str], overrides: Sequence[str] = ()) -> list[Member]:
    """Members `root/<name>` in the order given; each must hold a meta.json. `overrides`: the
    key=value words `make logits` was given, for the commands that messages name."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"models listed twice: {', '.join(repeated)}; give weights instead")
    members = []
    for name in names:
        folder = Path(root) / name
        meta_path = folder / "meta.json"
        remake = make_command("logits", name, list(overrides))
        if not meta_path.is_file():
            raise UserError(
                f"{meta_path} is missing: {name} has no complete logits; run `{remake}` first"
            )
        meta = read_meta(meta_path, remake)
        members.append(Member(name, folder, meta, meta.get("make_logits", remake)))
    return members


# The meta.json values that `make ensemble` and `make status` read, and what each must be when
# present (older files may lack some; each reader has its default).
META_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "run_dir": (str,),
    "make_logits": (str,),
    "checkpoint": (str,),
    "role": (str,),
    "view": (str,),
    "data_dir": (str,),
    "heldout_split": (str, type(None)),
    "scores": (dict,),
    "provenance": (dict, type(None)),
}
TOP1 = (int, float, type(None))
SCORE_TYPES = {
    "images": (int,),
    "trained_on": (bool,),
    "top1": TOP1,
    "top1_tencrop": TOP1,
    "top1_center": TOP1,
}


def read_meta(path: Path, remake: str) -> dict[str, Any]:
    """A meta.json as a dict; a damaged one (cut short, edited by hand: a value of another type,
    a held-out split without its scores) is named in one line, before anything is written."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        meta = err
    if not isinstance(meta, dict):
        raise UserError(f"{path} cannot be read ({meta}); rerun `{remake}`")
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"{path}: {problem}; rerun `{remake}`")
    return meta


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a parsed meta.json's values, or None."""
    problem = _type_problem({key: meta[key] for key in META_TYPES if key in meta}, META_TYPES)
    if problem:
        return problem
    scores = meta.get("scores", {})
    for split, score in scores.items():
        if not isinstance(score, dict):
            return f"scores.{split} is {json.dumps(score)}, not an object"
        problem = _type_problem({k: score[k] for k in SCORE_TYPES if k in score}, SCORE_TYPES)
        if problem:
            return f"scores.{split}.{problem}"
    held = meta.get("heldout_split")
    if held is not None and held not in scores:
        return f"heldout_split is {json.dumps(held)} but scores has no {json.dumps(held)}"
    return None


JSON_NAMES = {
    str: "a string",
    dict: "an object",
    type(None): "null",
    int: "a number",
    float: "a number",
    bool: "true or false",
}


def _type_problem(values: dict[str, Any], types: dict[str, tuple[type, ...]]) -> str | None:
    for key, value in values.items():
        # bool is an int to isinstance; a count or a top-1 given as true is still damage.
        if not isinstance(value, types[key]) or (
            isinstance(value, bool) and bool not in types[key]
        ):
            wanted = " or ".join(dict.fromkeys(JSON_NAMES[t] for t in types[key]))
            return f"{key} is {json.dumps(value)}, not {wanted}"
    return None


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Plain arrays only (ids as fixed-width unicode), loadable with allow_pickle=False."""
    for key, array in arrays.items():
        if array.dtype == object:
            raise TypeError(f"{key} is an object array; it would need pickle to load")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of an npz file, loaded without pickle."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}; rerun `make logits` for it")
            return {k: data[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} cannot be read ({err}); rerun `make logits` for it") from None


def _id_mismatch(path: Path, reference: np.ndarray, ids: np.ndarray) -> str | None:
    if len(np.unique(ids)) != len(ids):
        return f"{path}: duplicate ids"
    for what, diff in (
        ("missing", np.setdiff1d(reference, ids)),
        ("unexpected", np.setdiff1d(ids, reference)),
    ):
        if len(diff):
            shown = ", ".join(diff[:SHOWN].tolist()) + (", ..." if len(diff) > SHOWN else "")
            return f"{path}: {len(diff)} ids {what} compared with the first model ({shown})"
    return None


def check_rows(path: Path, ids: np.ndarray, probs: np.ndarray) -> None:
    """One row per id, no id twice, every row a probability distribution without NaN or inf;
    else one line naming `path`."""
    if probs.ndim != 2 or len(probs) != len(ids):
        raise UserError(f"{path}: probs {probs.shape} do not hold one row per id")
    if len(np.unique(ids)) != len(ids):
        raise UserError(f"{path}: duplicate ids; rerun `make logits` for it")
    if not np.isfinite(probs).all():
        raise UserError(f"{path}: probabilities hold NaN or inf; rerun `make logits` for it")
    _refuse_non_distributions(path, probs, ids)


def _refuse_non_distributions(path: Path, probs: np.ndarray, ids: np.ndarray) -> None:
    """Every row must be non-negative and sum to 1 (float16 tolerance); name the first that
    is not, and how many are not."""
    sums = probs.astype(np.float64).sum(axis=1)
    bad = (probs < 0).any(axis=1) | (np.abs(sums - 1.0) > SUM_TOLERANCE)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        low = float(probs[row].min())
        what = f"holds {low:.4g}" if low < 0 else f"sums to {sums[row]:.6g}"
        raise UserError(
            f"{path}: row {row} (id {ids[row]}) {what}; {int(bad.sum())} of {len(probs)} rows are "
            "not probability distributions (non-negative, summing to 1): rerun `make logits` "
            "for it, or store softmax probabilities"
        )


class SplitReader:
    """One split (val or test) of several members, each aligned to the first member read."""

    def __init__(self, split: str):
        self.split = split
        self.ids: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.num_classes: int | None = None
        self._order: dict[str, np.ndarray | None] = {}

    def read(self, member: Member) -> np.ndarray:
        """The member's probabilities [n, K], rows in the reference id order (dtype as stored)."""
        path = member.path(self.split)
        keys = ("ids", "probs", "labels") if self.split == "val" else ("ids", "probs")
        arrays = read_npz(path, keys)
        probs = arrays["probs"]
        check_rows(path, arrays["ids"], probs)
        if self.ids is None:
            self._set_reference(path, arrays)
        if probs.shape[1] != self.num_classes:
            raise UserError(
                f"{path}: {probs.shape[1]} classes where the first model has {self.num_classes}"
            )
        order = self._alignment(member.name, path, arrays["ids"])
        if order is not None:
            probs = probs[order]
        if self.labels is not None:
            labels = arrays["labels"] if order is None else arrays["labels"][order]
            if not np.array_equal(labels, self.labels):
                raise UserError(f"{path}: val labels differ from the first model's")
        return probs

    def _set_reference(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self.ids, self.num_classes = arrays["ids"], arrays["probs"].shape[1]
        self.labels = arrays.get("labels")

    def _alignment(self, name: str, path: Path, ids: np.ndarray) -> np.ndarray | None:
        """Row index that puts `ids` in reference order (None: already in it); cached per member."""
        if name in self._order:
            cached = self._order[name]
            ok = np.array_equal(self.ids, ids if cached is None else ids[cached])
            if ok:
                return cached
        if np.array_equal(self.ids, ids):
            order = None
        else:
            problem = _id_mismatch(path, self.ids, ids)
            if problem:
                raise UserError(f"{problem}; rerun `make logits` on the same dataset")
            by_id = np.argsort(ids)
            order = by_id[np.searchsorted(ids[by_id], self.ids)]
        self._order[name] = order
        return order


def _grouped(values: dict[str, str]) -> dict[str, list[str]]:
    """Member names grouped by value, in member order."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(value, []).append(name)
    return groups


def _listed(groups: dict[str, list[str]]) -> str:
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def training_code(record: dict[str, Any]) -> str:
    """The commits a member's run trained on (a resume may add one); `+dirty`: local changes."""
    training = record.get("training") or {}
    labels = []
    for state in [training, *training.get("resumed", [])]:
        dirty = "+dirty" if state.get("git_dirty") else ""
        label = (state.get("git_commit") or "unknown")[:12] + dirty
        if label not in labels:
            labels.append(label)
    return ", ".join(labels)


# What members must share, read from each meta.json's provenance record.
MUST_MATCH = {
    "datasets (manifest checksum)": lambda record: record.get("dataset_checksum"),
    "test ids": lambda record: (record.get("ids_sha256") or {}).get("test"),
}


def marker_files(step_dir: Path) -> dict[str, str] | None:
    """The sha256 of each file of a complete checkpoint, from its marker (None: incomplete)."""
    try:
        return json.loads((step_dir / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None


def logits_state(meta_path: Path, run: Path, remake: str) -> str:
    """none, or `checkpoint_state` of the logits whose meta.json is at `meta_path`."""
    if not meta_path.is_file():
        return "none"
    return checkpoint_state(read_meta(meta_path, remake), meta_path, run)


def checkpoint_state(meta: dict[str, Any], meta_path: Path, run: Path) -> str:
    """fresh (made from the run's best checkpoint as it is now, or the run has no best to
    compare with) or stale (made from another checkpoint, or older than the best)."""
    best = Path(run) / CHECKPOINTS / "best"
    best_files = marker_files(best)
    if best_files is None:
        return "fresh"
    digest = (meta.get("provenance") or {}).get("checkpoint_sha256")
    if digest is not None:
        role = meta.get("role", "teacher")
        return "fresh" if digest == best_files.get(f"{role}.safetensors") else "stale"
    # Logits made before meta.json recorded the digest: compare times.
    newer = meta_path.stat().st_mtime > (best / MARKER).stat().st_mtime
    return "fresh" if newer else "stale"


def stale_members(members: list[Member]) -> list[Member]:
    """Members whose logits come from an older best checkpoint than their run's now: the run
    trained on after `make logits`, and blending them would use the older model. Logits made
    from another checkpoint on purpose (`--checkpoint last|PATH`) are the user's choice."""
    return [
        m
        for m in members
        if m.meta.get("checkpoint", "best") == "best"
        and "run_dir" in m.meta
        and checkpoint_state(m.meta, m.folder / "meta.json", m.meta["run_dir"]) == "stale"
    ]


# What makes two members' logits the same predictions: one checkpoint file, read the same way.
SAME_PREDICTIONS = ("role", "view", "test_size", "resize_size")


def refuse_one_model_twice(members: list[Member]) -> None:
    """Two members with the same checkpoint file, role, view and resolution are one model
    counted twice (a copied folder): the blend would double its weight without saying so.
    One checkpoint at two test resolutions (multi-scale TTA) is two members."""
    predictions = {}
    for m in members:
        digest = (m.meta.get("provenance") or {}).get("checkpoint_sha256")
        if digest:
            predictions[m.name] = "/".join(
                [digest, *(str(m.meta.get(k)) for k in SAME_PREDICTIONS)]
            )
    groups = _grouped(predictions)
    twice = [names for names in groups.values() if len(names) > 1]
    if twice:
        raise UserError(
            f"{' and '.join(twice[0])} hold the logits of one model (the same checkpoint file, "
            "role, view and resolution); list it once, with a weight if it should count more"
        )


def check_provenance(members: list[Member]) -> list[str]:
    """Refuse members whose logits come from different datasets (manifest checksum) or test
    ids, or one model listed twice; return warnings to print: members trained on different
    commits, without a record, in a folder named after another model, or with logits older
    than their run's best checkpoint."""
    records = {m.name: m.meta.get("provenance") or {} for m in members}
    for what, field in MUST_MATCH.items():
        values = {name: field(r) for name, r in records.items()}
        groups = _grouped({name: v[:12] for name, v in values.items() if v})
        if len(groups) > 1:
            raise UserError(
                f"the members' logits come from different {what}: {_listed(groups)}; "
                "rerun `make logits MODEL=<name>` for the odd ones on the same dataset"
            )
    refuse_one_model_twice(members)
    warnings = [
        f"{m.folder / 'meta.json'} holds the logits of {m.meta['model']}, not {m.name} (a copied "
        "folder?)"
        for m in members
        if m.meta.get("model", m.name) != m.name
    ]
    commits = _grouped({name: training_code(r) for name, r in records.items() if r})
    if len(commits) > 1:
        warnings.append(f"members were trained on different commits: {_listed(commits)}")
    missing = [name for name, r in records.items() if not r]
    if missing:
        warnings.append(
            f"no provenance in the meta.json of {', '.join(missing)} (made before it was "
            "recorded); rerun `make logits` for them to check their dataset and commit"
        )
    stale = stale_members(members)
    if stale:
        warnings.append(
            f"the logits of {', '.join(m.name for m in stale)} come from an older best "
            "checkpoint than their run's now (it trained on after `make logits`): "
            + "; ".join(f"`{m.remake}`" for m in stale)
            + " brings them up to date"
        )
    return warnings

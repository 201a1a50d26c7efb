"""`make evaluate [SUBMISSION=...] [LABELS=...]`: validate a submission, then score its top-1.

The score is the challenge's (`evaluate_classification.py`: correct rows over compared rows), but
only after `validate_submission` has checked that the submission holds exactly the labels' ids,
once each, with integer classes in range: the official script would silently score a
submission with missing rows on the rows it has. Labels default to the `test_labels.csv` of the
dataset the submission was made from (named by `--data`, or by the `<name>.json` that
`make ensemble` wrote beside the CSV); any `Image IDs,label` file works, val labels included.
The zip that is uploaded is checked as the CSV inside it.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError, cli_main
from common.metrics import top1
from data_prep.layout import Layout
from ensemble.submission import read_labels, validate_submission


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "submission", type=Path, help="an `Image IDs,Predictions` CSV, or the zip holding it"
    )
    parser.add_argument("--labels", type=Path, help="an `Image IDs,label` CSV")
    parser.add_argument("--data", type=Path, help="a prepared dataset: its test_labels.csv")
    parser.add_argument("--num-classes", type=int, help="default: the json or the manifest")
    return parser.parse_args(argv)


def _report(submission: Path) -> dict[str, Any]:
    """The `<name>.json` that `make ensemble` wrote beside the CSV, or {}."""
    path = submission.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}); rerun `make ensemble`") from None
    if not isinstance(report, dict):
        raise UserError(f"{path} is not a `make ensemble` report; rerun `make ensemble`")
    return report


def unzipped(submission: Path) -> tuple[Path, bytes | None]:
    """The CSV to check: `submission` itself (None: read it from disk), or the one CSV inside
    the zip that is uploaded, named `<zip>:<csv>` in messages, and its bytes."""
    if submission.suffix.lower() != ".zip":
        return submission, None
    try:
        with zipfile.ZipFile(submission) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            if len(names) != 1 or not names[0].lower().endswith(".csv"):
                raise UserError(f"{submission} holds {names}; the server expects one CSV")
            return Path(f"{submission}:{names[0]}"), archive.read(names[0])
    except zipfile.BadZipFile as err:
        raise UserError(f"{submission} is not a readable zip ({err}); zip the CSV again") from None


def resolve_labels(args: argparse.Namespace, report: dict[str, Any]) -> Path:
    if args.labels is not None:
        return args.labels
    data_dir = args.data or (Path(report["data_dir"]) if report.get("data_dir") else None)
    if data_dir is None:
        raise UserError(
            f"no labels for {args.submission}: pass --labels FILE or --data DIR "
            "(make evaluate LABELS=FILE; no json with the dataset beside it)"
        )
    labels = Layout(Path(data_dir)).test_labels
    if not labels.is_file():
        raise UserError(
            f"{labels} is missing; pass --labels FILE (make evaluate LABELS=FILE) "
            f"or rebuild {data_dir}"
        )
    return labels


def require_submission_dataset(submission: Path, report: dict[str, Any], labels: Path) -> None:
    """Labels of another build of the dataset (another seed keeps the ids, not the labels) would
    score the submission as valid: refused when the labels sit in a dataset folder and the report
    names the dataset the members predicted (its checksum)."""
    members = (report.get("provenance") or {}).get("members")  # as make ensemble writes it
    records = members.values() if isinstance(members, dict) else []
    made_on = {r.get("dataset_checksum") for r in records if isinstance(r, dict)} - {None}
    layout = Layout(labels.parent)
    if not made_on or not layout.manifest.is_file():
        return
    checksum = layout.read_manifest().get("checksum")
    if checksum is not None and checksum not in made_on:
        raise UserError(
            f"{labels} belongs to {labels.parent} (manifest checksum {checksum[:12]}), not the "
            f"dataset {submission} was predicted on ({', '.join(sorted(made_on))[:12]}); pass "
            "that dataset's labels, or rerun `make logits` and `make ensemble` on this one"
        )


def resolve_num_classes(args: argparse.Namespace, report: dict[str, Any], labels: Path) -> int:
    """--num-classes, or the submission's json, or the manifest of the labels' dataset."""
    if args.num_classes is not None:
        return args.num_classes
    if report.get("num_classes"):
        return int(report["num_classes"])
    layout = Layout(labels.parent)
    if layout.manifest.is_file():
        return len(layout.classes())
    raise UserError(f"the class count for {args.submission} is unknown; pass --num-classes K")


def score(
    submission: Path, labels: Path, num_classes: int, data: bytes | None = None
) -> tuple[int, int]:
    """(correct, total) of a valid submission against a labels file (`data`: the submission's
    bytes when they are not its path's, as `validate_submission` takes them)."""
    truth = read_labels(labels)
    if not truth:
        raise UserError(f"{labels} holds no rows; pass a labels file with one row per image")
    predicted = validate_submission(submission, truth.keys(), num_classes, data)
    correct = sum(predicted[i] == label for i, label in truth.items())
    return correct, len(truth)


def logits_top1(folder: Path, labels: Path, split: str = "test") -> float:
    """Top-1 of one model's stored probabilities (`logits/<name>/<split>.npz`), rows matched
    to the labels file by id: every labelled id must be present."""
    with np.load(Path(folder) / f"{split}.npz", allow_pickle=False) as data:
        ids, probs = data["ids"].tolist(), data["probs"]
    truth = read_labels(labels)
    row = {image_id: i for i, image_id in enumerate(ids)}
    missing = [image_id for image_id in truth if image_id not in row]
    if missing:
        raise UserError(f"{folder}/{split}.npz lacks {len(missing)} ids of {labels}; rerun logits")
    order = np.array([row[image_id] for image_id in truth])
    return top1(probs[order], np.array(list(truth.values())))


@cli_main
def main(argv: Sequence[str] | None = None) -> float:
    args = parse_args(argv)
    if args.submission.is_dir():
        raise UserError(f"{args.submission} is a folder; pass the CSV (submissions/<name>.csv)")
    if not args.submission.is_file():
        raise UserError(f"{args.submission} does not exist; run `make ensemble` first")
    report = _report(args.submission)
    labels = resolve_labels(args, report)
    require_submission_dataset(args.submission, report, labels)
    shown, data = unzipped(args.submission)
    correct, total = score(shown, labels, resolve_num_classes(args, report, labels), data)
    top1 = 100.0 * correct / total
    print(f"{args.submission}: valid; top-1 {top1:.2f}% ({correct}/{total}) against {labels}")
    return top1


if __name__ == "__main__":
    main()

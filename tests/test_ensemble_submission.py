"""The submission CSV and its validator (ensemble/submission.py), and `make evaluate`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from ensemble.evaluate import require_submission_dataset, score
from ensemble.submission import read_labels, validate_submission, write_submission
from tests.conftest import run_command

IDS = [f"img_{i}.JPEG" for i in range(12)]
PREDICTIONS = np.array([3, 0, 9, 1, 1, 5, 7, 2, 8, 0, 4, 6])
LABELS = np.array([3, 1, 9, 1, 2, 5, 7, 2, 0, 0, 4, 5])  # 8 of 12 right


@pytest.fixture
def labels_file(tmp_path):
    path = tmp_path / "test_labels.csv"
    rows = "".join(f"{i},{label}\n" for i, label in zip(IDS, LABELS, strict=True))
    path.write_text("Image IDs,label\n" + rows)
    return path


@pytest.fixture
def submission(tmp_path):
    path = tmp_path / "sub" / "mine.csv"
    write_submission(path, IDS, PREDICTIONS, num_classes=10)
    return path


def test_written_csv_round_trips_through_pandas_and_the_validator(submission):
    frame = pd.read_csv(submission)
    assert list(frame.columns) == ["Image IDs", "Predictions"]
    assert frame["Image IDs"].tolist() == IDS
    assert frame["Predictions"].tolist() == PREDICTIONS.tolist()
    assert frame["Predictions"].dtype.kind == "i"
    expected = dict(zip(IDS, PREDICTIONS.tolist(), strict=True))
    assert validate_submission(submission, IDS, 10) == expected
    assert submission.read_text().splitlines()[1] == "img_0.JPEG,3"


def test_zip_holds_the_same_csv_and_is_byte_stable(submission):
    zip_path = submission.with_suffix(".zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["mine.csv"]
        assert archive.read("mine.csv") == submission.read_bytes()
    first = zip_path.read_bytes()
    write_submission(submission, IDS, PREDICTIONS, num_classes=10)
    assert zip_path.read_bytes() == first


def broken(text: str, edit: str) -> str:
    """A valid CSV text with one malformation."""
    lines = text.splitlines()
    if edit == "missing id":
        del lines[5]
    elif edit == "duplicate":
        lines.insert(3, lines[2])
    elif edit == "extra row":
        lines.append("img_99.JPEG,1")
    elif edit == "class out of range":
        lines[4] = "img_3.JPEG,10"
    elif edit == "negative class":
        lines[4] = "img_3.JPEG,-1"
    elif edit == "huge class":
        lines[4] = "img_3.JPEG,99999999999999999999999"
    elif edit == "wrong header":
        lines[0] = "Image IDs,Prediction"
    elif edit == "fractional class":
        lines[4] = "img_3.JPEG,1.5"
    elif edit == "third column":
        lines[4] = "img_3.JPEG,1,2"
    elif edit == "blank line":
        lines.insert(6, "")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "edit, message",
    [
        ("missing id", "1 test ids missing (img_4.JPEG)"),
        ("duplicate", "1 duplicate ids (img_1.JPEG)"),
        ("extra row", "1 rows with unexpected ids (img_99.JPEG)"),
        ("class out of range", "1 predictions outside [0, 10) (img_3.JPEG=10)"),
        ("negative class", "1 predictions outside [0, 10) (img_3.JPEG=-1)"),
        ("huge class", "1 predictions outside [0, 10) (img_3.JPEG=99999999999999999999999)"),
        ("wrong header", "header is 'Image IDs,Prediction'; it must be exactly 'Image IDs,Pred"),
        ("fractional class", "1 Predictions values are not integer class indices (img_3.JPEG="),
        ("third column", "line 5 is 'img_3.JPEG,1,2'"),
        ("blank line", "line 7 is ''"),
    ],
)
def test_every_broken_variant_is_refused_naming_the_problem(submission, tmp_path, edit, message):
    bad = tmp_path / f"{edit.replace(' ', '_')}.csv"
    bad.write_text(broken(submission.read_text(), edit))
    with pytest.raises(UserError) as err:
        validate_submission(bad, IDS, 10)
    assert str(err.value).startswith(f"{bad}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_many_missing_ids_are_counted_and_a_few_named(submission, tmp_path):
    bad = tmp_path / "short.csv"
    bad.write_text("\n".join(submission.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(UserError) as err:
        validate_submission(bad, IDS, 10)
    shown = ", ".join(IDS[2:7])
    assert str(err.value) == f"{bad}: 10 test ids missing ({shown}, ...)"


def test_a_submission_that_would_fail_validation_is_never_put_in_place(tmp_path):
    path = tmp_path / "bad.csv"
    with pytest.raises(UserError, match="outside"):
        write_submission(path, IDS[:2], np.array([0, 10]), num_classes=10)
    assert list(tmp_path.iterdir()) == []


def test_score_is_the_fraction_of_labelled_ids_predicted_right(submission, labels_file):
    correct, total = score(submission, labels_file, 10)
    expected = sum(int(p == t) for p, t in zip(PREDICTIONS, LABELS, strict=True))
    assert (correct, total) == (expected, 12) == (8, 12)


def test_labels_files_are_checked_too(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("Image IDs,label\nimg_0.JPEG,1\nimg_0.JPEG,2\n")
    with pytest.raises(UserError, match="1 duplicate ids"):
        read_labels(path)
    path.write_text("Image IDs,labels\nimg_0.JPEG,1\n")
    with pytest.raises(UserError, match="must be exactly 'Image IDs,label'"):
        read_labels(path)
    path.write_text("Image IDs,label\nimg_0.JPEG,1\nimg_1.JPEG,-2\nimg_2.JPEG,3e99\n")
    with pytest.raises(UserError, match="1 label values are not integer class indices"):
        read_labels(path)
    path.write_text(
        "Image IDs,label\nimg_0.JPEG,1\nimg_1.JPEG,-2\nimg_2.JPEG,99999999999999999999\n"
    )
    with pytest.raises(UserError, match=r"2 labels are not class indices in \[0, 2147483648\)"):
        read_labels(path)


def test_evaluate_command_scores_against_a_labels_file(submission, labels_file):
    proc = run_command(
        "-m",
        "ensemble.evaluate",
        str(submission),
        "--labels",
        str(labels_file),
        "--num-classes",
        "10",
    )
    assert "valid; top-1 66.67% (8/12)" in proc.stdout


def test_evaluate_command_finds_the_labels_and_class_count_from_the_json(submission, labels_file):
    report = {"data_dir": str(labels_file.parent), "num_classes": 10}
    submission.with_suffix(".json").write_text(json.dumps(report))
    proc = run_command("-m", "ensemble.evaluate", str(submission))
    assert f"top-1 66.67% (8/12) against {labels_file}" in proc.stdout


def test_evaluate_command_checks_the_zip_that_is_uploaded(submission, labels_file, tmp_path):
    zipped = submission.with_suffix(".zip")
    labelled = ["--labels", str(labels_file), "--num-classes", "10"]
    proc = run_command("-m", "ensemble.evaluate", str(zipped), *labelled)
    assert f"{zipped}: valid; top-1 66.67% (8/12)" in proc.stdout
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("a.csv", submission.read_text())
        archive.writestr("b.csv", submission.read_text())
    proc = run_command("-m", "ensemble.evaluate", str(two), *labelled, check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {two} holds ['a.csv', 'b.csv']; the server expects one CSV\n"
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("mine.csv", submission.read_text().replace("img_0.JPEG,3", "img_0.JPEG,x"))
    proc = run_command("-m", "ensemble.evaluate", str(bad), *labelled, check=False)
    assert proc.returncode == 2  # named by the zip the user has, not a temporary file
    assert proc.stderr.startswith(f"error: {bad}:mine.csv: 1 Predictions values are not integer")


def test_labels_of_another_build_of_the_dataset_are_refused(submission, tmp_path):
    """Fashion50 built with another seed: the same ids, other labels; the submission would
    score near chance as a valid one."""
    data = tmp_path / "fashion50"
    data.mkdir()
    labels = data / "test_labels.csv"
    labels.write_text("Image IDs,label\nimg_0.JPEG,3\n")
    (data / "manifest.json").write_text(json.dumps({"checksum": "b" * 64}))
    report = {"provenance": {"members": {"m1": {"dataset_checksum": "a" * 64}, "m2": None}}}
    with pytest.raises(UserError) as err:
        require_submission_dataset(submission, report, labels)
    assert str(err.value) == (
        f"{labels} belongs to {data} (manifest checksum bbbbbbbbbbbb), not the dataset "
        f"{submission} was predicted on (aaaaaaaaaaaa); pass that dataset's labels, or rerun "
        "`make logits` and `make ensemble` on this one"
    )
    report["provenance"]["members"]["m1"]["dataset_checksum"] = "b" * 64
    require_submission_dataset(submission, report, labels)  # the same build: scored
    require_submission_dataset(submission, {}, labels)  # no report: nothing to compare


def test_evaluate_command_names_a_damaged_report_in_one_line(submission, labels_file):
    submission.with_suffix(".json").write_text('{"data_dir": "da')
    proc = run_command("-m", "ensemble.evaluate", str(submission), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {submission.with_suffix('.json')} is damaged")


def test_evaluate_command_scores_val_predictions_against_val_labels(tmp_path):
    val_ids = ["ant/a.png", "ant/b.png", "bee/c.png"]
    labels = tmp_path / "val_labels.csv"
    rows = "".join(f"{i},{k}\n" for i, k in zip(val_ids, [0, 0, 1], strict=True))
    labels.write_text("Image IDs,label\n" + rows)
    predictions = tmp_path / "val_predictions.csv"
    write_submission(predictions, val_ids, np.array([0, 1, 1]), num_classes=2)
    proc = run_command(
        "-m", "ensemble.evaluate", str(predictions), "--labels", str(labels), "--num-classes", "2"
    )
    assert "top-1 66.67% (2/3)" in proc.stdout


def test_evaluate_command_refuses_a_submission_with_missing_rows(submission, labels_file, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(broken(submission.read_text(), "missing id"))
    proc = run_command(
        "-m",
        "ensemble.evaluate",
        str(bad),
        "--labels",
        str(labels_file),
        "--num-classes",
        "10",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: 1 test ids missing (img_4.JPEG)"


def test_evaluate_command_given_a_folder_asks_for_the_csv(tmp_path):
    proc = run_command("-m", "ensemble.evaluate", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path} is a folder; pass the CSV (submissions/<name>.csv)\n"


def test_evaluate_command_without_labels_says_how_to_give_them(submission):
    proc = run_command("-m", "ensemble.evaluate", str(submission), check=False)
    assert proc.returncode == 2
    assert "pass --labels FILE or --data DIR (make evaluate LABELS=FILE;" in proc.stderr


def test_evaluate_command_whose_dataset_lost_its_labels_says_how_to_give_them(submission):
    """The json beside the CSV names a dataset folder without test_labels.csv."""
    data = submission.parent / "gone"
    data.mkdir()
    submission.with_suffix(".json").write_text(json.dumps({"data_dir": str(data)}))
    proc = run_command("-m", "ensemble.evaluate", str(submission), check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {data / 'test_labels.csv'} is missing; pass --labels FILE "
        f"(make evaluate LABELS=FILE) or rebuild {data}\n"
    )


def official_score(labels: Path, submission: Path) -> float:
    """The challenge's evaluate_classification.py: pandas rows by position, `==` per id."""
    truth = {row[0]: row for row in pd.read_csv(labels).to_numpy()}
    sub = {row[0]: row for row in pd.read_csv(submission).to_numpy()}
    compared = [truth[i][1] == sub[i][1] for i in truth if i in sub]
    return sum(compared) / len(compared)


@pytest.mark.parametrize("quirk", ["bom", "integral floats", "both", "blank lines at the end"])
def test_what_the_official_scorer_reads_the_same_is_accepted_with_a_warning(
    submission, labels_file, tmp_path, quirk
):
    lines = submission.read_text().splitlines()
    if quirk in ("integral floats", "both"):
        lines[1:] = [f"{row}.0" if i % 2 else f"{row}." for i, row in enumerate(lines[1:])]
    text = "\n".join(lines) + ("\n\n\n" if quirk == "blank lines at the end" else "\n")
    odd = tmp_path / "excel.csv"
    odd.write_bytes((b"\xef\xbb\xbf" if quirk in ("bom", "both") else b"") + text.encode())
    assert official_score(labels_file, odd) == official_score(labels_file, submission) == 8 / 12
    proc = run_command(
        "-m", "ensemble.evaluate", str(odd), "--labels", str(labels_file), "--num-classes", "10"
    )
    assert "valid; top-1 66.67% (8/12)" in proc.stdout
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == (2 if quirk == "both" else 1)
    assert all(line.startswith(f"warning: {odd}") for line in warnings)
    if quirk in ("bom", "both"):
        assert "byte-order mark" in proc.stderr
    if quirk in ("integral floats", "both"):
        assert "12 Predictions values are written as floats" in proc.stderr
    if quirk == "blank lines at the end":
        assert proc.stderr == f"warning: {odd} ends with blank lines: the scorer skips them\n"


def test_a_fractional_class_is_refused_because_the_scorer_counts_it_wrong(
    submission, labels_file, tmp_path
):
    lines = submission.read_text().splitlines()
    lines[1] = "img_0.JPEG,3.5"  # the label is 3: the scorer finds 3.5 != 3
    bad = tmp_path / "half.csv"
    bad.write_text("\n".join(lines) + "\n")
    assert official_score(labels_file, bad) == 7 / 12
    proc = run_command(
        "-m",
        "ensemble.evaluate",
        str(bad),
        "--labels",
        str(labels_file),
        "--num-classes",
        "10",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {bad}: 1 Predictions values are not integer class indices (img_0.JPEG='3.5')"
    )

"""The official split lists: safe loading and verification, via `python -m data_prep imagenet`."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import pytest

from common.errors import UserError
from data_prep.splits import load_list
from tests.conftest import run_command


@pytest.fixture(scope="module")
def official(splits_dir: Path) -> dict[str, list]:
    # The official files are trusted test data: plain pickle is the independent reader here.
    names = ("train", "val", "test")
    return {name: pickle.loads((splits_dir / f"{name}.pickle").read_bytes()) for name in names}


def check_lists(folder: Path):
    return run_command(
        "-m", "data_prep", "imagenet", "--splits", str(folder), "--check", check=False
    )


def damaged(tmp_path: Path, splits_dir: Path, name: str, data: object) -> Path:
    """A copy of the official folder with `name`.pickle replaced by `data`."""
    folder = tmp_path / "splits"
    shutil.copytree(splits_dir, folder)
    (folder / f"{name}.pickle").write_bytes(pickle.dumps(data))
    return folder


def test_official_lists_verify(splits_dir, official):
    proc = check_lists(splits_dir)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    # What verification claims, recounted here by brute force.
    for name in ("train", "val"):
        per_class = Counter(wnid for wnid, _ in official[name])
        assert len(per_class) == 1000 and set(per_class.values()) == {50}
    assert not {f for _, f in official["train"]} & {f for _, f in official["val"]}
    assert len(official["test"]) == 50_000


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("train", lambda lists: lists["train"][1:], "has 49 entries, expected 50"),
        ("val", lambda lists: lists["val"][:-1] + [lists["train"][-1]], "in both train.pickle"),
        ("test", lambda lists: lists["test"][:-1], "has 49999 entries, expected 50000"),
        ("test", lambda lists: lists["test"][:-1] + ["../../etc/passwd"], "is not 'wnid/ILSVRC"),
    ],
    ids=["train-count", "overlap", "test-count", "test-entry"],
)
def test_damaged_lists_fail_with_a_clear_message(
    tmp_path, splits_dir, official, name, damage, message
):
    folder = damaged(tmp_path, splits_dir, name, damage(official))
    proc = check_lists(folder)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert str(folder) in proc.stderr


class RunsCode:
    """Unpickling this calls os.system: what a malicious 'split list' would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_carrying_code_is_refused_without_running_it(tmp_path, splits_dir, official):
    marker = tmp_path / "code-ran"
    folder = damaged(tmp_path, splits_dir, "val", [RunsCode(marker)] + official["val"][1:])
    proc = check_lists(folder)
    assert proc.returncode == 2
    assert f"{folder / 'val.pickle'}" in proc.stderr and "system" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_the_unpickler_refuses_every_global_at_every_protocol(tmp_path, protocol):
    # Protocol 0 encodes a global with GLOBAL, later ones with STACK_GLOBAL: both are refused.
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps([["n01440764", Path("a")]], protocol=protocol))
    with pytest.raises(UserError, match="refuses global pathlib"):
        load_list(path)


@pytest.mark.parametrize("data", [{"a": "b"}, [1, 2], "text", [["a", 3]], [{"a"}]])
def test_the_unpickler_accepts_only_lists_of_strings(tmp_path, data):
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(UserError, match="other than a list of strings"):
        load_list(path)


def test_the_unpickler_reads_lists_and_tuples_of_strings(tmp_path):
    path = tmp_path / "x.pickle"
    data = [["n01440764", "n01440764_1.JPEG"], ("a", "b"), "c"]
    path.write_bytes(pickle.dumps(data))
    assert load_list(path) == data


def test_a_truncated_pickle_is_refused(tmp_path, splits_dir):
    path = tmp_path / "train.pickle"
    path.write_bytes((splits_dir / "train.pickle").read_bytes()[:1000])
    with pytest.raises(UserError, match="train.pickle is not a plain list"):
        load_list(path)


def test_a_missing_list_names_the_file(tmp_path, splits_dir):
    folder = tmp_path / "splits"
    shutil.copytree(splits_dir, folder)
    (folder / "test.pickle").unlink()
    proc = check_lists(folder)
    assert proc.returncode == 2 and f"{folder / 'test.pickle'} is missing" in proc.stderr

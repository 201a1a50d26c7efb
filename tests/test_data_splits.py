"""The official split lists: the shipped copies, their provenance, and the toolkit's pickles
(safe loading, verification, equality with the shipped lists), via `python -m data_prep imagenet`
and `python -m data_prep.convert_splits`."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import shutil
import zlib
from collections import Counter
from pathlib import Path

import pytest

from common.errors import UserError
from data_prep.splits import load_list, read_shipped
from tests.conftest import SHIPPED_SPLITS, SPLIT_NAMES, run_command

# The zlib that compressed the shipped files; another build may pick other bytes for the same CSV.
SHIPPED_ZLIB = "1.2.13"


def check_lists(*splits: str):
    return run_command("-m", "data_prep", "imagenet", *splits, "--check", check=False)


def damaged(tmp_path: Path, splits_dir: Path, name: str, data: object) -> Path:
    """A copy of the toolkit folder with `name`.pickle replaced by `data`."""
    folder = tmp_path / "splits"
    shutil.copytree(splits_dir, folder)
    (folder / f"{name}.pickle").write_bytes(pickle.dumps(data))
    return folder


def readme_checksums() -> dict[str, str]:
    """File name -> sha256 as data_prep/vipriors/README.md states them ('<name>.csv' = inside)."""
    text = (SHIPPED_SPLITS / "README.md").read_text()
    sums = {}
    for line in text.splitlines():
        match = re.fullmatch(
            r"\| `(\w+)\.pickle` \| `(\w{64})` \| `\w+\.csv\.gz` \| `(\w{64})` \| `(\w{64})` \|",
            line,
        )
        if match:
            name = match.group(1)
            sums |= {
                f"{name}.pickle": match[2],
                f"{name}.csv.gz": match[3],
                f"{name}.csv": match[4],
            }
    return sums


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_shipped_lists_verify(official_lists):
    proc = check_lists()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{SHIPPED_SPLITS}: the official VIPriors lists (verified)\n"
    # What verification claims, recounted here by brute force.
    for name in ("train", "val"):
        per_class = Counter(wnid for wnid, _ in official_lists[name])
        assert len(per_class) == 1000 and set(per_class.values()) == {50}
    assert not {f for _, f in official_lists["train"]} & {f for _, f in official_lists["val"]}
    test = official_lists["test"]
    assert len(test) == len(set(test)) == 50_000
    assert set(Counter(e.split("/")[0] for e in test).values()) == {50}


def test_the_shipped_lists_are_the_official_pickles_and_match_their_readme(splits_dir):
    sums = readme_checksums()
    assert len(sums) == 9
    for name in SPLIT_NAMES:
        # Pickled back as the toolkit did, the shipped lists give the toolkit's exact bytes.
        assert sha256((splits_dir / f"{name}.pickle").read_bytes()) == sums[f"{name}.pickle"]
        shipped = (SHIPPED_SPLITS / f"{name}.csv.gz").read_bytes()
        assert sha256(shipped) == sums[f"{name}.csv.gz"]
        assert sha256(gzip.decompress(shipped)) == sums[f"{name}.csv"]
    assert "Copyright (c) 2020 VIPriors" in (SHIPPED_SPLITS / "LICENSE").read_text()


def test_the_toolkit_pickles_verify_against_the_shipped_lists(splits_dir):
    proc = check_lists("--splits", str(splits_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{splits_dir}: the official VIPriors lists (verified)\n"


def other_train_file(lists):
    """A well-formed train entry the lists do not hold: verification passes, equality does not."""
    wnid = lists["train"][0][0]
    return [[wnid, f"{wnid}_99999999.JPEG"]] + lists["train"][1:]


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        ("train", lambda lists: lists["train"][1:], "has 49 entries, expected 50"),
        ("val", lambda lists: lists["val"][:-1] + [lists["train"][-1]], "files are in both"),
        ("test", lambda lists: lists["test"][:-1], "has 49999 entries, expected 50000"),
        ("test", lambda lists: lists["test"][:-1] + ["../../etc/passwd"], "is not 'wnid/ILSVRC"),
        (
            "test",
            lambda lists: lists["test"][1::-1] + lists["test"][2:],
            f"test.pickle differs from the shipped {SHIPPED_SPLITS / 'test.csv.gz'} at entry 0",
        ),
        (
            "train",
            other_train_file,
            f"train.pickle differs from the shipped {SHIPPED_SPLITS / 'train.csv.gz'} at entry 0",
        ),
    ],
    ids=["train-count", "overlap", "test-count", "test-entry", "test-order", "train-file"],
)
def test_damaged_lists_fail_with_a_clear_message(
    tmp_path, splits_dir, official_lists, name, damage, message
):
    folder = damaged(tmp_path, splits_dir, name, damage(official_lists))
    proc = check_lists("--splits", str(folder))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert str(folder / f"{name}.pickle") in proc.stderr


class RunsCode:
    """Unpickling this calls os.system: what a malicious 'split list' would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_carrying_code_is_refused_without_running_it(tmp_path, splits_dir, official_lists):
    marker = tmp_path / "code-ran"
    folder = damaged(tmp_path, splits_dir, "val", [RunsCode(marker)] + official_lists["val"][1:])
    proc = check_lists("--splits", str(folder))
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
    proc = check_lists("--splits", str(folder))
    assert proc.returncode == 2 and f"{folder / 'test.pickle'} is missing" in proc.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:5000], "is not a gzipped UTF-8 CSV"),
        (lambda data: b"not gzip", "is not a gzipped UTF-8 CSV"),
        (lambda data: gzip.compress(gzip.decompress(data)[6:]), "does not start with the header"),
        (
            lambda data: gzip.compress(gzip.decompress(data).replace(b"JPEG\n", b"JPEG,x\n", 1)),
            "is not [wnid, '<wnid>_<n>.JPEG']",
        ),
    ],
    ids=["truncated", "not-gzip", "header", "extra-column"],
)
def test_a_damaged_shipped_list_names_the_file(tmp_path, damage, message):
    folder = tmp_path / "vipriors"
    shutil.copytree(SHIPPED_SPLITS, folder)
    path = folder / "train.csv.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=re.escape(message)) as err:
        read_shipped(folder)
    assert str(path) in str(err.value)


@pytest.fixture(scope="module")
def converted(splits_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    proc = run_command(
        "-m", "data_prep.convert_splits", "--splits", str(splits_dir), "--out", str(out)
    )
    for name in SPLIT_NAMES:
        for path in (splits_dir / f"{name}.pickle", out / f"{name}.csv.gz"):
            assert f"{sha256(path.read_bytes())}  {path}\n" in proc.stdout
    return out


def test_the_conversion_writes_the_shipped_lists_deterministically(converted, splits_dir):
    first = {name: (converted / f"{name}.csv.gz").read_bytes() for name in SPLIT_NAMES}
    run_command(
        "-m", "data_prep.convert_splits", "--splits", str(splits_dir), "--out", str(converted)
    )
    for name, data in first.items():
        assert (converted / f"{name}.csv.gz").read_bytes() == data
        # gzip header: no flags (so no file name) and mtime 0.
        assert data[3] == 0 and data[4:8] == bytes(4)
        shipped = (SHIPPED_SPLITS / f"{name}.csv.gz").read_bytes()
        assert gzip.decompress(data) == gzip.decompress(shipped)


@pytest.mark.skipif(
    zlib.ZLIB_RUNTIME_VERSION != SHIPPED_ZLIB,
    reason=f"the shipped files were compressed by zlib {SHIPPED_ZLIB}",
)
def test_the_conversion_reproduces_the_shipped_bytes(converted):
    for name in SPLIT_NAMES:
        shipped = SHIPPED_SPLITS / f"{name}.csv.gz"
        assert (converted / f"{name}.csv.gz").read_bytes() == shipped.read_bytes()

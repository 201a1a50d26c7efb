"""`python -m data_prep fashion`: the embedded benchmark against the Fashion-MNIST idx files."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import fashion
from tests.conftest import ROOT, run_command

IDX = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's documented label order, and the folder names the build promises.
NAMES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]


def read_idx(name: str, header: int) -> np.ndarray:
    """The idx payload after its header (16 bytes for images, 8 for labels)."""
    return np.frombuffer(gzip.decompress((IDX / name).read_bytes())[header:], dtype=np.uint8)


@pytest.fixture(scope="module")
def source() -> dict[str, np.ndarray]:
    return {
        "train_x": read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "train_y": read_idx("train-labels-idx1-ubyte.gz", 8),
        "test_x": read_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "test_y": read_idx("t10k-labels-idx1-ubyte.gz", 8),
    }


def build_fashion(out: Path, seed: int = 0):
    return run_command("-m", "data_prep", "fashion", "--out", str(out), "--seed", str(seed))


@pytest.fixture
def built(fashion_dir) -> Path:
    """The session's build (conftest), shared with the training tests: read, never modified."""
    return fashion_dir


def tree_digest(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_counts_and_class_folders(built):
    meta = json.loads((built / "manifest.json").read_text())
    assert meta["classes"] == sorted(NAMES)
    for split in ("train", "val"):
        assert meta["counts"][split] == dict.fromkeys(sorted(NAMES), 50)
        for name in NAMES:
            assert len(list((built / split / name).glob("*.png"))) == 50
    assert meta["counts"]["test"] == 10_000
    assert sorted(p.name for p in (built / "test/imgs").iterdir()) == sorted(
        f"img_{i}.png" for i in range(10_000)
    )


def test_train_and_val_images_and_labels_match_the_source(built, source):
    seen = set()
    for split in ("train", "val"):
        for name in NAMES:
            for path in (built / split / name).iterdir():
                index = int(path.stem.removeprefix("fmnist_"))
                assert NAMES[source["train_y"][index]] == name
                pixels = np.asarray(Image.open(path))
                assert pixels.dtype == np.uint8 and np.array_equal(pixels, source["train_x"][index])
                assert index not in seen  # train and val are disjoint draws
                seen.add(index)
    assert len(seen) == 1000


def test_test_images_are_the_whole_test_set_with_their_labels(built, source):
    labels_of = defaultdict(set)  # pixel digest -> source labels (duplicates exist)
    for pixels, label in zip(source["test_x"], source["test_y"], strict=True):
        labels_of[hashlib.sha256(pixels.tobytes()).hexdigest()].add(int(label))
    rows = (built / "test_labels.csv").read_text().splitlines()
    assert rows[0] == "Image IDs,label" and len(rows) == 10_001
    digests = []
    for i, row in enumerate(rows[1:]):
        name, label = row.split(",")
        assert name == f"img_{i}.png"
        digest = hashlib.sha256(np.asarray(Image.open(built / "test/imgs" / name)).tobytes())
        digests.append(digest.hexdigest())
        # The label is the sorted-name index of the source label's class name.
        assert sorted(NAMES)[int(label)] in {NAMES[y] for y in labels_of[digests[-1]]}
    expected = sorted(hashlib.sha256(p.tobytes()).hexdigest() for p in source["test_x"])
    assert sorted(digests) == expected  # every test image exactly once
    assert digests[:20] != expected[:20]  # and shuffled, not in source order


def test_the_same_seed_gives_byte_identical_output(built, tmp_path):
    again = tmp_path / "again"
    build_fashion(again)
    assert tree_digest(again) == tree_digest(built)
    proc = build_fashion(again)  # a rerun of a complete build keeps every file
    assert "test: 10000 files (10000 kept)" in proc.stdout
    assert tree_digest(again) == tree_digest(built)


def test_another_seed_draws_other_images(source):
    data = (source["train_x"], source["train_y"]), (source["test_x"], source["test_y"])
    plans = [fashion.make_plan(*data, seed=seed) for seed in (0, 1)]
    paths = [{rel for _, rel in plan.items if not rel.startswith("test/")} for plan in plans]
    assert len(paths[0]) == len(paths[1]) == 1000 and paths[0] != paths[1]
    assert plans[0].test_labels != plans[1].test_labels


def test_missing_idx_files_name_the_fix(tmp_path):
    proc = run_command(
        "-m",
        "data_prep",
        "fashion",
        "--out",
        str(tmp_path / "out"),
        "--idx",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode == 2
    assert f"{tmp_path / 'train-images-idx3-ubyte.gz'} is missing" in proc.stderr
    assert "make setup" in proc.stderr and not (tmp_path / "out").exists()


def test_ctrl_c_stops_a_build_at_once_in_one_line(tmp_path):
    """The thread pool drops the chunks not started (it ran every queued one before exiting)
    and the running ones stop at their next file; a rerun resumes (test_data_imagenet.py)."""
    out = tmp_path / "f50"
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", "fashion", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a pytest-xdist worker ignores SIGINT, and its children inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    images = out / "test" / "imgs"
    while proc.poll() is None and (not images.is_dir() or len(os.listdir(images)) < 300):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, err  # killed by it, as a shell loop needs
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in err
    assert len(os.listdir(images)) < 1_000 and not (out / "manifest.json").exists()

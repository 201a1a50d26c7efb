"""Shared fixtures: the official split lists (shipped in data_prep/vipriors/, and as the
toolkit's pickles), and the embedded benchmark built once per session."""

from __future__ import annotations

import os

# `make test` is the CPU suite, on a GPU machine too: its bit-identical resumes and two-process
# runs are the CPU's semantics (on one GPU, two processes are refused by train.launch). Hidden
# before anything asks CUDA, whose driver reads this once. GPU_TESTS=1 keeps the GPU, for
# tests/test_gpu.py (`make test-gpu`).
if os.environ.get("GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import csv
import gzip
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from data_prep.fashion import IDX_DIR
from data_prep.layout import Layout
from train.config import load_config

# The usual umask, whatever the shell's, for the commands too: the modes the pipeline's files
# get are then known (tests/test_train.py).
os.umask(0o022)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SPLITS = ROOT / "data_prep" / "vipriors"
SPLIT_NAMES = ("train", "val", "test")
# The training runs of the tests: demo_resnet18 at the demo members' quarter width, read from
# their config rather than restated. The same code paths as the full width, at about a tenth of
# the compute and a sixteenth of the checkpoint bytes: 2 epochs on the tiny dataset in 12 s
# instead of 30 s, and 17 MB of checkpoints instead of 257 MB (2026-12-06, 2-core AMD EPYC).
NARROW = f"arch_kwargs={json.dumps(load_config('demo_resnet18_w16')['arch_kwargs'])}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked `longest` first: with two workers, one runs it while the other takes
    the rest, instead of one running it alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytests_folder(tmp_path_factory):
    """The temporary files of the tests and of the commands they start (the launcher's status
    folder, DataLoader's and torchrun's) go under pytest's folder, which keeps the last three
    sessions: the runs the tests SIGKILL cannot remove theirs, and they piled up in /tmp, about
    twenty a suite."""
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    tempfile.tempdir = None  # read TMPDIR again


@pytest.fixture(scope="session")
def official_lists() -> dict[str, list]:
    """The shipped split lists in the toolkit's entry format, read with gzip and csv alone:
    [wnid, file] per train and val row, the 'wnid/file' string per test row.

    One string object per wnid, as in the toolkit's pickles: pickled back with protocol 3 they
    then reproduce those pickles byte for byte (shared strings are pickled as memo references).
    """
    lists = {}
    for name in SPLIT_NAMES:
        with gzip.open(SHIPPED_SPLITS / f"{name}.csv.gz", "rt", newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        pool: dict[str, str] = {}
        if name == "test":
            lists[name] = [row[0] for row in rows]
        else:
            lists[name] = [[pool.setdefault(wnid, wnid), file] for wnid, file in rows]
    return lists


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request) -> Path:
    """A directory the module's tests share, deleted when the module ends: the runs made in it
    hold checkpoints of about 130 MB each, and keeping every module's until the session ends
    would make the suite need tens of GB of free disk."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def splits_dir(official_lists, tmp_path_factory) -> Path:
    """The toolkit's train/val/test.pickle, written from the shipped lists."""
    folder = tmp_path_factory.mktemp("toolkit")
    for name, entries in official_lists.items():
        (folder / f"{name}.pickle").write_bytes(pickle.dumps(entries, protocol=3))
    return folder


# The longest command of the suite (the smoke subset's) took 7 minutes on one thread (`make
# test`'s workers) under emulated AVX2 (2026-12-06): a command still running after 30 fails its test
# instead of holding CI to its limit (a DataLoader worker forked while another thread held
# CPython's runtime lock hangs for good on Python < 3.11.8, gh-112275; seen once, 2026-12-06,
# on 3.11.7).
COMMAND_TIMEOUT_S = 1800


def run_command(*args: str, cwd: Path = ROOT, check: bool = True, **kwargs):
    """Run `python -m ...` the way the Makefile does, returning the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})}
    kwargs.setdefault("timeout", COMMAND_TIMEOUT_S)
    try:
        proc = subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{args} still running after {err.timeout:.0f} s: hung") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """The embedded benchmark, built once by the real command; on a machine without Debian's
    Fashion-MNIST (a GPU machine the tree was copied to, for `make test-gpu`), the complete
    `data/fashion50` copied with it, which the tests only read."""
    copied = ROOT / "data" / "fashion50"
    if not IDX_DIR.is_dir() and Layout(copied).manifest.is_file():
        return copied
    out = tmp_path_factory.mktemp("data") / "fashion50"
    run_command("-m", "data_prep", "fashion", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def tiny_dir(fashion_dir, tmp_path_factory) -> Path:
    """A 10-class dataset of 8 train, 3 val and 2 test images per class, cut from fashion50
    by the `folder` source: small enough for training runs inside tests."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    run_command(
        "-m",
        "data_prep",
        "folder",
        "--root",
        str(fashion_dir / "train"),
        "--per-class",
        "8,3,2",
        "--out",
        str(out),
    )
    return out


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process and refuses another precision once set; a test
    that needs its own (bf16) starts from none, as a command's process does, and leaves none."""

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()

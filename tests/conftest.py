"""Shared fixtures: the official split lists, and the embedded benchmark built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def splits_dir() -> Path:
    """The official VIPriors split lists, from VIPRIORS_SPLITS (set by .ci/run)."""
    path = Path(os.environ.get("VIPRIORS_SPLITS", ROOT.parent / "shared" / "vipriors"))
    if not (path / "train.pickle").is_file():
        pytest.fail(f"VIPRIORS_SPLITS={path} holds no train.pickle; point it at the split lists")
    return path


def run_command(*args: str, cwd: Path = ROOT, check: bool = True, **kwargs):
    """Run `python -m ...` the way the Makefile does, returning the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """The embedded benchmark, built once by the real command."""
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

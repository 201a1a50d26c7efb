"""`make chaos` (scripts/ops/chaos.py): SIGKILLed at random moments, a run must lose nothing."""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from scripts.ops import chaos
from scripts.ops.chaos import compare, schedule
from tests.conftest import run_command


@pytest.mark.slow
def test_ten_kills_including_checkpoint_writes_and_evaluation_are_all_survived():
    proc = run_command("-m", "scripts.ops.chaos", "--kills", "10")
    kills = re.findall(r"^kill \d+/10 \((\w+), after step \d+\): (.*)$", proc.stdout, re.M)
    assert len(kills) == 10, proc.stdout
    assert any(where.startswith("while writing a checkpoint") for _, where in kills), proc.stdout
    assert ("evaluation", True) in {(m, w.startswith("in evaluation")) for m, w in kills} or any(
        m == "evaluation" and w.startswith("while writing") for m, w in kills
    ), proc.stdout
    assert re.search(r"^kills survived: 10/10 \(\d+ s\)$", proc.stdout, re.M), proc.stdout


def test_the_schedule_meets_a_checkpoint_write_and_an_evaluation_in_run_order():
    for seed in range(20):
        plan = schedule(10, random.Random(seed))
        assert len(plan) == 10 and [after for _, after in plan] == sorted(a for _, a in plan)
        modes = [mode for mode, _ in plan]
        assert modes.count("checkpoint") == 1 and modes.count("evaluation") == 1
        assert dict(plan)["evaluation"] in (9, 18)  # the last checkpoint before an epoch's end


def test_a_kill_the_run_outran_is_tried_again_from_its_folder_as_it_was(tmp_path, monkeypatch):
    """A busy machine can make the reference's pace a poor guide: the run ends before the kill."""
    out = tmp_path / "killed"
    checkpoints = out / chaos.MODEL / "checkpoints"
    (checkpoints / "step_000000003").mkdir(parents=True)
    starts, draws, status = [], [], [0]
    outcomes = iter(["missed: the run ended first", "at random (newest complete: step 3)"])

    def run_to_the_end(data, out_dir):
        starts.append(sorted(p.name for p in checkpoints.iterdir()))
        (checkpoints / "step_000000020").mkdir()
        return subprocess.CompletedProcess([], status[0])

    def kill(proc, run, mode, after, gap, draw):
        draws.append(draw)
        return next(outcomes)

    monkeypatch.setattr(chaos, "start", run_to_the_end)
    monkeypatch.setattr(chaos, "kill_once", kill)
    where = chaos.kill_landing(tmp_path, out, "random", 3, 1.0, random.Random(7))
    assert where == "at random (newest complete: step 3) (try 2: the run outran the kill)"
    first = random.Random(7).random()
    assert starts == [["step_000000003"]] * 2 and draws == [first, first / 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]

    (checkpoints / "step_000000020").rmdir()  # the landed kill's start went to the end too
    outcomes = iter(["missed: the run ended first"] * chaos.TRIES)
    where = chaos.kill_landing(tmp_path, out, "random", 3, 1.0, random.Random(7))
    assert where == f"missed: the run ended first {chaos.TRIES} times"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000000003"]

    # A run that fails is not tried again: the failure is the finding, its folder kept as it is.
    status[0], outcomes = 1, iter(["missed: the run ended first"])
    where = chaos.kill_landing(tmp_path, out, "random", 3, 1.0, random.Random(7))
    assert where == f"failed: the run exited 1; see {out / 'log.txt'}"
    assert len(starts) == 2 + chaos.TRIES + 1 and (checkpoints / "step_000000020").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]


def fake_run(root, weight: float):
    """A run folder with one checkpoint, as train/checkpoint.py writes it, and metrics."""
    step = root / "checkpoints" / "step_000000003"
    step.mkdir(parents=True)
    for role in ("student", "teacher"):
        save_file({"w": torch.full((3,), weight)}, step / f"{role}.safetensors")
    state = {
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}},
        "history": [{"epoch": 1, "loss": 0.5, "img_per_s": weight * 100}],
        "config": {"out_dir": str(root), "seed": 0},
    }
    torch.save(state, step / "state.pt")
    torch.save({"torch": torch.get_rng_state(), "python": [3, [1, 2], None]}, step / "rng_rank0.pt")
    (step / "COMPLETE").write_text("{}")
    pd.DataFrame([{"epoch": 1, "loss": 0.5, "img_per_s": weight}]).to_csv(root / "metrics.csv")
    return step


def test_the_comparison_ignores_timing_and_out_dir_and_finds_any_other_difference(tmp_path):
    fake_run(tmp_path / "a", 1.0)
    other = fake_run(tmp_path / "b", 1.0)
    assert compare(tmp_path / "a", tmp_path / "b") == []
    state = torch.load(other / "state.pt", weights_only=True)
    state["history"][0]["img_per_s"] = 12345.0  # timing only
    torch.save(state, other / "state.pt")
    assert compare(tmp_path / "a", tmp_path / "b") == []
    state["optimizer"]["state"][0]["momentum_buffer"][1] = 1.0 + 2**-20
    torch.save(state, other / "state.pt")
    rng = torch.load(other / "rng_rank0.pt", weights_only=True)
    rng["python"][1][0] = 9
    torch.save(rng, other / "rng_rank0.pt")
    save_file({"w": torch.tensor([1.0, 1.0, 1.0 + 2**-20])}, other / "teacher.safetensors")
    assert compare(tmp_path / "a", tmp_path / "b") == [
        "step_000000003/rng_rank0.pt differs",
        "step_000000003/state.pt differs",
        "step_000000003/teacher.safetensors differs",
    ]
    shutil.rmtree(other)
    assert compare(tmp_path / "a", tmp_path / "b") == ["step_000000003: missing after the kills"]

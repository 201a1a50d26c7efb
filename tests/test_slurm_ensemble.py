"""`make slurm-ensemble`: the whole chain against a fake SLURM (tests/fake_slurm.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from ensemble.blend import load_ensemble_config
from tests.conftest import run_command
from tests.fake_slurm import Scheduler, install, load_jobs

MODELS = load_ensemble_config("demo")["models"]


def overrides(data: Path, base: Path) -> list[str]:
    # 80 images, batch 8: 10 steps, a checkpoint every 3.
    return [
        f"data_dir={data}",
        f"out_dir={base / 'runs'}",
        f"logits_dir={base / 'logits'}",
        "epochs=1",
        "batch_size=8",
        "workers=0",
        "ckpt_every_steps=3",
        "warmup_epochs=1",
        "lr=0.05",
        "train_splits=[train]",
    ]


def submit(data: Path, base: Path) -> dict[str, str]:
    env = install(base / "bin", base / "slurm")
    args = ["--config", "demo", "--nodes", "1", "--gpus-per-node", "1"]
    args += ["--submissions", str(base / "subs"), *overrides(data, base)]
    run_command("-m", "scripts.ops.slurm_ensemble", *args, env=env)
    return env


def test_a_chain_refused_half_way_cancels_what_it_submitted(tiny_dir, tmp_path):
    env = {**install(tmp_path / "bin", tmp_path / "slurm"), "FAKE_SBATCH_REFUSES": "3"}
    args = [
        "--config",
        "demo",
        "--nodes",
        "1",
        "--gpus-per-node",
        "1",
        *overrides(tiny_dir, tmp_path),
    ]
    proc = run_command("-m", "scripts.ops.slurm_ensemble", *args, env=env, check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: sbatch refused ") and "QOSMaxSubmitJobPerUserLimit" in line
    assert line.endswith(
        "; cancelled the 2 jobs submitted before it (1, 2): rerun once the cause is fixed"
    )
    jobs = load_jobs(env["FAKE_SLURM_DIR"])
    assert [job["state"] for job in jobs.values()] == ["CANCELLED", "CANCELLED"]


def newest_step(run: Path) -> int:
    done = [p for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()]
    return max((int(p.name[5:14]) for p in done), default=-1)


def test_each_logits_job_waits_for_its_training_and_the_ensemble_for_all_logits(tiny_dir, tmp_path):
    base = tmp_path / "it's a cluster"  # sbatch and bash both see the quotes
    env = submit(tiny_dir, base)
    jobs = {job["name"]: job for job in load_jobs(env["FAKE_SLURM_DIR"]).values()}
    assert len(jobs) == 2 * len(MODELS) + 1  # training and logits per model, one ensemble
    for name in MODELS:
        assert jobs[name]["after"] == []
        assert jobs[f"logits-{name}"]["after"] == [jobs[name]["id"]]
        assert jobs[f"logits-{name}"]["kill_on_invalid_dep"]
        assert jobs[name]["output"] == str(base / "runs" / name / f"slurm-{jobs[name]['id']}.out")
    logits_ids = sorted(jobs[f"logits-{name}"]["id"] for name in MODELS)
    assert sorted(jobs["ensemble-demo"]["after"]) == logits_ids
    recorded = json.loads((base / "runs" / ".slurm" / "demo" / "jobs.json").read_text())
    assert recorded["ensemble"] == {"demo": jobs["ensemble-demo"]["id"]}
    queue = subprocess.run(["squeue"], env={**env}, capture_output=True, text=True).stdout
    assert queue.count("PENDING") == len(jobs) and "afterok:" in queue
    for script in (base / "runs" / ".slurm" / "demo").glob("*.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


@pytest.mark.slow
def test_the_chain_runs_in_order_and_a_preempted_training_job_requeues_and_resumes(
    tiny_dir, tmp_path
):
    base = tmp_path / "it's a cluster"  # sbatch and bash both see the quotes
    env = submit(tiny_dir, base)
    preempted = MODELS[0]
    run = base / "runs" / preempted

    def preempt(job: dict) -> bool:  # SLURM's early warning, once a checkpoint exists
        return job["name"] == preempted and job["restarts"] == 0 and newest_step(run) >= 3

    scheduler = Scheduler(env, preempt)
    jobs = scheduler.run()
    assert {job["name"]: job["state"] for job in jobs.values()} == {
        name: "COMPLETED" for name in [*MODELS, *(f"logits-{m}" for m in MODELS), "ensemble-demo"]
    }
    events = [(what, name) for what, _, name in scheduler.events]
    assert events.count(("start", preempted)) == 2
    assert events.index(("signal", preempted)) < events.index(("requeue", preempted))
    for name in MODELS:
        assert events.index(("end", name)) < events.index(("start", f"logits-{name}"))
        assert events.index(("end", f"logits-{name}")) < events.index(("start", "ensemble-demo"))
    log = "".join(p.read_text() for p in run.glob("slurm-[0-9]*.out"))
    assert "USR1: checkpointing" in log and "requeueing" in log and "resumed from" in log
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1]
    ensemble_log = next((base / "runs" / ".slurm" / "demo").glob("ensemble-*.out")).read_text()
    assert "demo.csv: valid; top-1" in ensemble_log
    report = json.loads((base / "subs" / "demo.json").read_text())
    assert sorted(report["provenance"]["members"]) == sorted(MODELS)

"""`make demo` end to end, through its real script, on a tiny dataset (make ablation, sweep,
long-run and tsne: tests/test_evidence.py)."""

from __future__ import annotations

import json

import pytest

from ensemble.blend import load_ensemble_config
from scripts.bench.gpu_check import CPU_DEMO_S
from tests.conftest import run_command

pytestmark = pytest.mark.slow


def test_the_demo_runs_every_stage_and_prints_the_closing_table(tiny_dir, tmp_path):
    overrides = [
        f"data_dir={tiny_dir}",
        f"out_dir={tmp_path / 'runs'}",
        f"logits_dir={tmp_path / 'logits'}",
        "epochs=1",
        "batch_size=8",
        "holdout_per_class=0",
        "warmup_epochs=0",
        "ckpt_every_steps=0",
    ]
    args = ["-m", "scripts.ops.demo", *overrides, "--submissions", str(tmp_path / "subs")]
    args += ["--timings", str(tmp_path / "timings.json")]
    out = run_command(*args).stdout
    models = load_ensemble_config("demo")["models"]
    assert len(models) >= 2  # an ensemble
    closing = out[out.rindex("\nmodel ") :].splitlines()  # the closing table, header first
    for model in models:
        assert (tmp_path / "runs" / model / "metrics.csv").is_file()
        assert (tmp_path / "logits" / model / "test.npz").is_file()
        assert any(line.startswith(f"{model} ") for line in closing)
    assert (tmp_path / "subs" / "demo.zip").is_file()
    assert "valid; top-1" in out
    results, timing = out.rsplit("Where the minutes went", 1)
    table = [line for line in results.splitlines() if line.startswith("ensemble ")]
    assert table and table[-1].endswith("demo.json")
    timing = timing.splitlines()
    stages = ["data", *(f"train {m}" for m in models), *(f"TenCrop logits {m}" for m in models)]
    for stage in stages:
        assert any(line.startswith(f"{stage} ") for line in timing), stage
    assert timing[-1].startswith("total") and timing[-1].endswith("min)")
    seconds = json.loads((tmp_path / "timings.json").read_text())  # the same stages, for gpu-check
    assert list(seconds) == [*stages, "ensemble", "evaluate"] and min(seconds.values()) >= 0
    assert set(CPU_DEMO_S) <= set(seconds)  # the stages gpu-check's total compares
    again = run_command(*args).stdout  # a rerun reuses what is done
    assert again.count("up to date, kept") == len(models)

"""`make status`: the heartbeat's verdicts, and the table of a real tiny run as it goes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ensemble.blend import load_ensemble_config
from scripts.ops import status
from tests.conftest import ROOT, run_command
from train import checkpoint, heartbeat

MODELS = load_ensemble_config("demo")["models"]
TRAINED = MODELS[0]  # the member that the tiny run trains


def test_status_reads_the_checkpoint_layout_that_training_writes():
    assert checkpoint.checkpoint_root(Path("run")) == Path("run") / status.CHECKPOINTS
    assert status.MARKER == checkpoint.MARKER


def test_status_imports_no_torch_so_that_it_answers_at_once():
    probe = "import sys, scripts.ops.status; print('torch' in sys.modules)"
    assert run_command("-c", probe).stdout.strip() == "False"


def test_the_heartbeat_says_running_killed_silent_or_how_the_run_ended(tmp_path):
    assert heartbeat.activity(tmp_path) == "-"
    heartbeat.write(tmp_path, "running", 3, time.time())
    assert heartbeat.activity(tmp_path) == "running"  # this process
    beat = json.loads((tmp_path / heartbeat.FILE).read_text())
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / heartbeat.FILE).write_text(json.dumps({**beat, "pid": gone.pid}))
    assert heartbeat.activity(tmp_path) == "killed"
    elsewhere = {**beat, "host": "another-node", "pid": 1}
    (tmp_path / heartbeat.FILE).write_text(json.dumps(elsewhere))
    assert heartbeat.activity(tmp_path) == "running"
    later = beat["updated"] + heartbeat.SILENT_AFTER_S + 1
    assert heartbeat.activity(tmp_path, now=later) == "silent"
    heartbeat.write(tmp_path, "stopped", 4, beat["started"])
    assert heartbeat.activity(tmp_path) == "stopped"


def test_ages_read_in_the_largest_whole_unit():
    assert [status.age(s) for s in (None, 5, 125, 7200, 3 * 86400)] == ["-", "5s", "2m", "2h", "3d"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "is empty; restore the run's config there"), ("epochs: [1\n", "invalid YAML")],
)
def test_a_broken_run_config_is_one_line_naming_it(tiny_dir, tmp_path, text, problem, capsys):
    saved = tmp_path / "runs" / TRAINED / "config.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(text)
    with pytest.raises(SystemExit):
        status.main(["--config", "demo", *overrides(tiny_dir, tmp_path)])
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {saved}") and problem in line


def test_the_run_s_lock_decides_whether_it_runs_whatever_its_pid_or_beat_says(tmp_path):
    """The kernel holds the lock exactly while the trainer lives: a pid reused by another
    process is not a running run, and a requeued run not yet beating is one."""
    from common.lock import FileLock

    heartbeat.write(tmp_path, "running", 3, time.time())  # this (living) process's pid
    lock = FileLock(tmp_path / heartbeat.LOCK, "run", "wait")
    with lock:
        assert heartbeat.activity(tmp_path) == "running"
        heartbeat.write(tmp_path, "stopped", 3, time.time())  # the beat before a requeue
        assert heartbeat.activity(tmp_path) == "running"
    heartbeat.write(tmp_path, "running", 3, time.time())
    assert heartbeat.activity(tmp_path) == "killed"  # its pid lives on, its lock is free


def test_a_damaged_heartbeat_reads_as_none_and_a_damaged_metric_is_one_line(
    tiny_dir, tmp_path, capsys
):
    run = tmp_path / "runs" / TRAINED
    run.mkdir(parents=True)
    heartbeat.write(run, "running", 3, time.time())
    beat = json.loads((run / heartbeat.FILE).read_text())
    for damaged in (
        {k: v for k, v in beat.items() if k != "host"},
        {**beat, "pid": "12"},
        {**beat, "pid": 0},
        [1],
    ):
        (run / heartbeat.FILE).write_text(json.dumps(damaged))
        assert heartbeat.activity(run) == "-"
    (run / status.METRICS).write_text("epoch,heldout_teacher\n1,12.5\n2,n/a\n")
    with pytest.raises(SystemExit):
        status.main(["--config", "demo", *overrides(tiny_dir, tmp_path)])
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {run / status.METRICS}: heldout_teacher holds 'n/a', not a")


def overrides(data: Path, base: Path) -> list[str]:
    return [
        f"data_dir={data}",
        f"out_dir={base / 'runs'}",
        f"logits_dir={base / 'logits'}",
        "epochs=1",
        "batch_size=8",
        "workers=0",
        "ckpt_every_steps=3",
        "keep_last=50",
        "train_splits=[train]",
    ]


def blend(args: list[str], base: Path) -> str:
    """`make ensemble` of the trained member alone, given the same overrides; its stderr."""
    out = ["--models", TRAINED, "--out-dir", str(base / "submissions")]
    return run_command("-m", "ensemble.blend", *args, *out).stderr


def table(args: list[str]) -> dict[str, list[str]]:
    """The rows of `python -m scripts.ops.status`, split into cells, by model; and the outlook."""
    out = run_command("-m", "scripts.ops.status", "--config", "demo", *args).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1 : 1 + len(MODELS)]}
    *_, outlook, footnote = out.strip().splitlines()
    rows["outlook"] = [outlook]
    assert footnote == f"(each command above with ARGS={shlex.quote(shlex.join(args))})"
    return rows


@pytest.mark.slow
def test_status_follows_a_tiny_run_from_training_to_fresh_logits(tiny_dir, tmp_path):
    args = overrides(tiny_dir, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "train", TRAINED, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = []
    while trainer.poll() is None:
        seen.append(table(args)[TRAINED])
        if seen[-1][4] == "running":
            break
    assert any(row[4] == "running" and row[-1] == "(training)" for row in seen), seen
    assert trainer.wait() == 0

    run = tmp_path / "runs" / TRAINED
    best = pd.read_csv(run / "metrics.csv")["heldout_teacher"].max()
    rows = table(args)
    assert rows[TRAINED][:2] == [TRAINED, "1/1"]
    assert rows[TRAINED][2] == f"{best:.2f}"
    assert rows[TRAINED][4:] == ["done", "none", "make", "logits", f"MODEL={TRAINED}"]
    for other in (m for m in MODELS if m != TRAINED):
        assert rows[other] == [
            other,
            "0/1",
            "-",
            "-",
            "-",
            "none",
            "make",
            "train",
            f"MODEL={other}",
        ]
    assert rows["outlook"] == [
        "make ensemble ENSEMBLE=demo: would stop, no logits for " + ", ".join(MODELS)
    ]

    older = run / "checkpoints" / "step_000000003"
    run_command("-m", "ensemble.logits", TRAINED, *args, "--checkpoint", str(older))
    assert table(args)[TRAINED][5:] == ["stale", "make", "logits", f"MODEL={TRAINED}"]
    assert "best checkpoint" not in blend(args, tmp_path)  # another checkpoint, chosen: no warning
    run_command("-m", "ensemble.logits", TRAINED, *args)
    assert table(args)[TRAINED][5:] == ["fresh", "-"]
    assert "best checkpoint" not in blend(args, tmp_path)
    # The run's best moves after `make logits`, as training on would move it: stale, and
    # `make ensemble` says so with the command that made them, overrides included.
    checkpoint.mark_best(run, older)
    assert table(args)[TRAINED][5:] == ["stale", "make", "logits", f"MODEL={TRAINED}"]
    remake = f"make logits MODEL={TRAINED} ARGS={shlex.quote(shlex.join(args))}"
    assert (
        f"the logits of {TRAINED} come from an older best checkpoint than their run's now (it "
        f"trained on after `make logits`): `{remake}` brings them up to date"
    ) in blend(args, tmp_path)

    # A member's folder copied under another member's name: one model, refused if counted
    # twice, and named when alone.
    other = next(m for m in MODELS if m != TRAINED)
    shutil.copytree(tmp_path / "logits" / TRAINED, tmp_path / "logits" / other)
    out = ["--out-dir", str(tmp_path / "submissions")]
    proc = run_command("-m", "ensemble.blend", *args, "--models", TRAINED, other, *out, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"error: {TRAINED} and {other} hold the logits of one model"
    )
    alone = run_command("-m", "ensemble.blend", *args, "--models", other, *out).stderr
    assert f"holds the logits of {TRAINED}, not {other} (a copied folder?)" in alone

    # Sixteen runs (hard-linked copies of this one, named as vipriors16's models): one read.
    sixteen = tmp_path / "sixteen"
    names = status.load_ensemble_config("vipriors16")["models"]
    for name in names:
        shutil.copytree(run, sixteen / "runs" / name, copy_function=os.link)
    started = time.perf_counter()
    text = status.main(["--config", "vipriors16", f"out_dir={sixteen / 'runs'}"])
    elapsed = time.perf_counter() - started
    assert [line.split()[1] for line in text.splitlines()[1:17]] == ["1/1"] * 16
    assert elapsed < 3.0, f"status of 16 runs took {elapsed:.2f} s"

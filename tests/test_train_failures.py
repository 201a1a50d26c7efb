"""`make train` when things go wrong: it ends promptly, with one line, and never loses progress.

A damaged image read by a loader worker, a worker killed by the kernel, losses that stay
non-finite, a loader that hangs when SIGTERM comes, two trainers on one run, a disk that fills up
during a checkpoint, keep_last set to keep nothing, a run stopped early and then turned into
logits, a run started from another folder. Each through the real command on the tiny dataset.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from common.errors import UserError
from common.lock import holder
from tests.conftest import NARROW, ROOT, run_command
from train.config import load_config, run_dir
from train.data import ignore_stop_signals, kill_loader_workers, worker_death

RUN = [
    "demo_resnet18",
    NARROW,
    "batch_size=8",
    "warmup_epochs=1",
    "lr=0.05",
    "train_splits=[train]",
]
PATIENCE_S = 300  # far beyond any of these runs on a loaded machine; a hang fails the test


def args_for(data: Path, out: Path, *extra: str) -> list[str]:
    return [*RUN, f"data_dir={data}", f"out_dir={out}", *extra]


def start(args: list[str], module: str = "train") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # to end a hung run and everything it started
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """Wait for the run; a run that does not end within PATIENCE_S is killed and fails."""
    try:
        out, err = proc.communicate(timeout=PATIENCE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the run did not end within {PATIENCE_S} s")
    return proc.returncode, out, err


def errors(text: str) -> list[str]:
    """The `error:` lines (progress bars share lines with them through carriage returns)."""
    return re.findall(r"error: [^\r\n]*", text)


def children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for init to reap it has ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        assert proc.poll() is None, f"the run ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.01)


@pytest.fixture
def data(tiny_dir, tmp_path) -> Path:
    """A private copy (real copies, not links) of the tiny dataset, to damage."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_dir, copy)
    return copy


def train_images(data: Path) -> list[Path]:
    return sorted((data / "train").rglob("*.png"))


@pytest.mark.slow
def test_a_truncated_image_in_a_loader_worker_ends_make_train_with_one_line_and_status_2(
    data, tmp_path
):
    bad = train_images(data)[5]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = start(args_for(data, tmp_path, "epochs=1", "workers=2"), module="train.launch")
    code, out, err = finish(proc)
    assert code == 2, out + err
    assert errors(err) == [
        f"error: cannot read image {bad} (image file is truncated); replace or remove the file "
        "and rerun `make data`"
    ]


def test_a_run_whose_losses_stay_non_finite_stops_after_max_nonfinite_with_one_line(
    tiny_dir, tmp_path
):
    # lr=1e30: the first update blows the weights up, every forward after it overflows. A
    # checkpoint is due at every step, yet none is written among the skipped ones.
    args = args_for(
        tiny_dir, tmp_path, "epochs=1", "lr=1e30", "max_nonfinite=3", "ckpt_every_steps=1"
    )
    code, out, err = finish(start(args))
    assert code == 2, out + err
    last = int(re.search(r"step (\d+);", err).group(1))  # the third skipped step
    saved = [int(p.name[5:]) for p in (tmp_path / "demo_resnet18" / "checkpoints").glob("step_*")]
    assert saved and max(saved) < last - 2, (saved, last)  # the finite steps' only
    message = (
        r"error: 3 optimiser steps in a row skipped for a non-finite loss at epoch 1, step \d+; "
        r"no checkpoint written after them\. Lower lr, enable grad_clip, or use mixed_precision=no"
    )
    assert len(errors(err)) == 1 and re.fullmatch(message, errors(err)[0]), err
    # The progress bar was closed first: the error is a line of its own, the last.
    assert [line for line in re.split(r"[\r\n]", err) if line.strip()][-1] == errors(err)[0]


def test_a_checkpoint_point_inside_a_stretch_of_skipped_steps_is_taken_after_it():
    """ckpt_every_steps=3: step 3 is skipped (non-finite), so its checkpoint waits for step 4,
    the first finite one; step 6 is due as usual."""
    from types import SimpleNamespace

    from train.run import Run

    loop = SimpleNamespace(
        cfg={"ckpt_every_steps": 3}, micro=1, sampler=SimpleNamespace(steps=50), save_due=False
    )
    loop.steps_missed = False
    due = []
    for step, skipped in [(2, 0), (3, 1), (4, 0), (5, 0)]:
        loop.global_step, loop.nonfinite_run = step, skipped
        due.append(Run._checkpoint_due(loop))
        if due[-1]:
            loop.steps_missed = False  # as save() does
    loop.global_step, loop.nonfinite_run = 6, 0
    assert due == [False, False, True, False] and Run._checkpoint_due(loop)


@pytest.mark.slow
def test_a_loader_worker_killed_by_the_kernel_ends_the_run_with_one_line_and_status_2(
    data, tmp_path
):
    proc = start(args_for(data, tmp_path, "epochs=2", "workers=2"))
    # Once the loop starts, the children are the loader's workers (before, accelerate may run
    # short-lived helpers).
    wait_for(lambda: (tmp_path / "demo_resnet18" / "config.yaml").is_file(), proc)
    wait_for(lambda: len(children(proc.pid)) == 2, proc)
    os.kill(min(children(proc.pid)), signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 2, out + err
    [line] = errors(err)
    assert re.fullmatch(
        r"error: DataLoader worker \(pid(\(s\))? \d+\) (is killed by signal: Killed|exited "
        r"unexpectedly): a data loader process "
        r"died, most often for lack of memory; lower workers= .*resumes from its newest checkpoint",
        line,
    ), line


def test_a_loader_worker_dead_of_a_bus_error_is_named_a_lack_of_shared_memory():
    # torch's text (torch/csrc/DataLoader.cpp) when the SIGCHLD handler sees the SIGBUS first;
    # the loop's own check may instead say "exited unexpectedly" (the test above).
    died = RuntimeError(
        "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
        "dataloader's workers are out of shared memory. Please try to raise your shared memory "
        "limit."
    )
    shm = shutil.disk_usage("/dev/shm").total / 2**20
    assert str(worker_death(died)) == (
        "DataLoader worker (pid 4242) is killed by signal: Bus error: a data loader process ran "
        f"out of shared memory (/dev/shm holds {shm:.0f} MiB); give it more (a container: docker "
        "run --shm-size=16g), or lower workers= or batch_size=, and rerun: the run resumes from "
        "its newest checkpoint"
    )
    assert worker_death(RuntimeError("CUDA error: out of memory")) is None


def test_the_workers_killed_at_exit_are_the_loader_s_and_no_other_child_of_the_process():
    """`train()` called from a notebook: the notebook's own processes outlive the run."""
    own = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    own.start()
    loader = torch.utils.data.DataLoader(
        range(8), num_workers=1, persistent_workers=True, worker_init_fn=ignore_stop_signals
    )
    next(iter(loader))
    (worker,) = [p for p in multiprocessing.active_children() if p.pid != own.pid]
    # torch's SIGCHLD handler would report the kill as a crashed worker, as at exit.
    handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        kill_loader_workers()
        worker.join(10)
        assert worker.exitcode == -signal.SIGKILL
        assert own.is_alive()
    finally:
        own.kill()
        own.join()
        signal.signal(signal.SIGCHLD, handler)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_ends_a_run_whose_loader_hangs_within_stop_timeout_s(data, tmp_path, workers):
    for image in train_images(data):  # every image a FIFO: opening one blocks forever
        image.unlink()
        os.mkfifo(image)
    run = tmp_path / "demo_resnet18"
    args = args_for(data, tmp_path, "epochs=1", f"workers={workers}", "stop_timeout_s=3")
    proc = start(args)
    wait_for(lambda: (run / "config.yaml").is_file(), proc)  # the loop is about to start
    time.sleep(1)
    workers_seen = children(proc.pid)
    assert len(workers_seen) == workers
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, out, err = finish(proc)
    assert code == 75 and time.monotonic() - sent < 60, out + err
    assert errors(err) == [
        "error: no checkpoint within stop_timeout_s=3 s of the stop signal (a data loader worker "
        "or another process hangs); exiting without one: a rerun resumes from the newest "
        "checkpoint"
    ]
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers_seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers_seen)  # not left blocked on the FIFO
    assert not list((run / "checkpoints").glob("step_*"))
    assert holder(run / "train.lock") is None


@pytest.mark.slow
def test_two_trainers_started_together_on_one_run_the_second_is_refused_naming_the_first(
    tiny_dir, tmp_path
):
    # Long enough that the holder still trains when the refused one has exited, however
    # slowly a loaded machine lets it exit: it is killed below.
    args = args_for(tiny_dir, tmp_path, "epochs=50", "workers=0")
    first, second = start(args), start(args)
    while first.poll() is None and second.poll() is None:
        time.sleep(0.05)
    refused, running = (first, second) if first.poll() is not None else (second, first)
    code, out, err = finish(refused)
    lock = tmp_path / "demo_resnet18" / "train.lock"
    info = holder(lock)
    running.kill()
    running.communicate()
    assert code == 2, out + err
    assert info["pid"] == running.pid
    assert errors(err) == [
        f"error: run {tmp_path / 'demo_resnet18'} is in use by pid {running.pid} on "
        f"{socket.gethostname()}, started {info['started']} (lock {lock}); wait for it to end, "
        "stop it, or train under another name="
    ]
    assert holder(lock) is None  # the kernel released the killed holder's lock


DISK_FULL = """
import errno, sys
import train.checkpoint as checkpoint

write = checkpoint.write_bytes_atomic

def full_at_step_6(path, data):
    if path.parent.name == "step_000000006.tmp" and path.name == "teacher.safetensors":
        path.write_bytes(data[: len(data) // 2])  # what a disk that fills up leaves behind
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    write(path, data)

checkpoint.write_bytes_atomic = full_at_step_6
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_says_how_much_room_it_needs_and_loses_nothing(
    tiny_dir, tmp_path
):
    """keep_last=1 too: the newest checkpoint and the one `best` copies are never deleted."""
    args = args_for(tiny_dir, tmp_path, "epochs=1", "workers=0", "ckpt_every_steps=3")
    args.append("keep_last=1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    checkpoints = tmp_path / "demo_resnet18" / "checkpoints"
    assert proc.returncode == 2, proc.stderr
    [line] = errors(proc.stderr)
    needed = re.fullmatch(
        rf"error: no space left in {checkpoints} for checkpoint step 6 \(No space left on "
        r"device\); a checkpoint needs about ([\d,]+) MB there: free space or set out_dir= to a "
        r"disk with room, then rerun: it resumes from the newest complete checkpoint",
        line,
    )
    assert needed, line
    written = sum(f.stat().st_size for f in (checkpoints / "step_000000003").iterdir())
    # (whole MB in the message)
    assert int(needed.group(1).replace(",", "")) == pytest.approx(written / 1e6, rel=0.05, abs=0.5)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000000003"]  # no partial
    resumed = run_command("-m", "train", *args)
    assert f"resumed from {checkpoints / 'step_000000003'}" in resumed.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step_000000010"]


def fake_checkpoint(folder: Path, step: int, world: int = 1, sealed: bool = True) -> Path:
    """The files of a checkpoint written by `world` processes, and its marker if `sealed`."""
    from train.checkpoint import MARKER, _expected, _sha256

    folder.mkdir(parents=True)
    for name in _expected(world):
        (folder / name).write_bytes(f"{folder.name}/{name}".encode())
    if sealed:
        files = {name: _sha256(folder / name) for name in _expected(world)}
        marker = {"step": step, "world_size": world, "files": files}
        (folder / MARKER).write_text(json.dumps(marker))
    return folder


def test_a_kill_between_two_renames_is_repaired_before_a_resume_looks(tmp_path):
    from train.checkpoint import latest_valid, repair, verify

    root = tmp_path / "checkpoints"
    fake_checkpoint(root / "step_000000003", 3)
    sealed = fake_checkpoint(root / "step_000000006.tmp", 6)  # killed after sealing, before rename
    fake_checkpoint(root / "step_000000009.tmp", 9, sealed=False)  # killed while writing
    fake_checkpoint(root / "best.old", 3)  # killed between mark_best's renames
    fake_checkpoint(root / "best.tmp", 6, sealed=False)  # its copy had not finished
    marker = (sealed / "COMPLETE").read_text()
    repair(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["best", "step_000000003", "step_000000006"]
    assert (root / "step_000000006" / "COMPLETE").read_text() == marker
    assert latest_valid(tmp_path) == root / "step_000000006" and verify(root / "best")


def test_a_checkpoint_missing_another_process_s_rng_state_is_neither_sealed_nor_valid(tmp_path):
    from train.checkpoint import _sealed, verify

    two = fake_checkpoint(tmp_path / "step_000000004", 4, world=2)
    assert verify(two)
    (two / "rng_rank1.pt").unlink()  # written to another node's own disk
    with pytest.raises(UserError, match="lacks rng_rank1.pt that other processes wrote: out_dir="):
        _sealed(two, 2)
    marker = json.loads((two / "COMPLETE").read_text())
    del marker["files"]["rng_rank1.pt"]
    (two / "COMPLETE").write_text(json.dumps(marker))
    assert not verify(two)  # a marker that vouches for one process of two


def test_retention_keeps_the_newest_and_the_one_best_copies_whatever_keep_last(tmp_path):
    from train.checkpoint import MARKER, _retain

    root = tmp_path / "checkpoints"
    for step in (3, 6, 9, 10, 13):
        (root / f"step_{step:09d}").mkdir(parents=True)
        (root / f"step_{step:09d}" / MARKER).write_text(json.dumps({"step": step}))
    (root / "step_000000016.tmp").mkdir()  # being written: never counted, never deleted here
    (root / "best").mkdir()
    (root / "best" / MARKER).write_text(json.dumps({"step": 6}))
    for keep_last in (0, -1, 1):
        _retain(root, keep_last)
        assert sorted(p.name for p in root.iterdir()) == [
            "best",
            "step_000000006",
            "step_000000013",
            "step_000000016.tmp",
        ]


@pytest.mark.slow
def test_a_run_stopped_early_is_named_by_make_logits_which_records_its_step_and_epoch(
    tiny_dir, tmp_path
):
    """Also: allow_config_change=true records the config actually used in config.yaml."""
    args = args_for(tiny_dir, tmp_path, "workers=0")
    run_command("-m", "train", *args, "epochs=1")
    run = tmp_path / "demo_resnet18"
    # 8 epochs to go: the stop lands long before the run could end on its own.
    proc = start([*args, "epochs=8", "allow_config_change=true"])
    wait_for(lambda: yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 8, proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 75 and "stopped on request" in out, out + err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 8 and saved["allow_config_change"] is True
    logits = tmp_path / "logits"
    proc = run_command(
        "-m", "ensemble.logits", *args, "epochs=8", f"logits_dir={logits}", "--center-crop"
    )
    stopped = int(re.search(r"stopped on request; checkpoint at step (\d+)", out).group(1))
    assert (
        f"warning: run demo_resnet18 stopped early, after 1 of 8 epochs (newest checkpoint: "
        f"step {stopped}); these logits come from {run / 'checkpoints' / 'best'} (step 10)"
    ) in proc.stderr
    meta = json.loads((logits / "demo_resnet18" / "meta.json").read_text())
    assert meta["checkpoint"] == "best" and meta["checkpoint_step"] == 10
    assert (meta["checkpoint_epoch"], meta["epochs"], meta["run_finished"]) == (1, 8, False)


@pytest.mark.slow
def test_epochs_added_on_resume_train_on_the_schedule_in_use_not_at_the_saved_end(
    tiny_dir, tmp_path
):
    """A cosine schedule saved at its end has lr 0 there: restoring it would train every added
    epoch at lr 0. The added epochs follow the new schedule: at the end of epoch 2 of 3, a cosine
    from the global lr to min_lr 0 stands at a quarter of its start (1 + cos(2 pi / 3)) / 2."""
    import pandas as pd
    import torch

    from train.run import global_lr

    args = args_for(tiny_dir, tmp_path, "workers=0", "warmup_epochs=0", "weight_decay=0.01")
    run_command("-m", "train", *args, "epochs=1")
    run_command("-m", "train", *args, "epochs=3", "weight_decay=0.02", "allow_config_change=true")
    resumed = pd.read_csv(tmp_path / "demo_resnet18" / "metrics.csv")
    assert resumed["epoch"].tolist() == [1, 2, 3]
    assert resumed["lr"].iloc[0] == 0  # the end of the 1-epoch schedule
    start = global_lr(load_config(RUN[0], RUN[1:]), 1)
    assert resumed["lr"].iloc[1] == pytest.approx(start / 4) and start > 0
    newest = max((tmp_path / "demo_resnet18" / "checkpoints").glob("step_*"))
    groups = torch.load(newest / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.02}  # the config in use (norms: 0)


def test_make_logits_without_a_best_checkpoint_names_the_folder_and_the_training_command(
    tiny_dir, tmp_path
):
    model, *overrides = args_for(tiny_dir, tmp_path, "workers=0", "name=mine")
    proc = run_command("-m", "ensemble.logits", model, *overrides, check=False)
    best = tmp_path / "mine" / "checkpoints" / "best"
    assert proc.returncode == 2
    [line] = errors(proc.stderr)
    command = line.split("train it first (", 1)[1].rsplit(") or pass", 1)[0]
    assert line == (
        f"error: no complete 'best' checkpoint (looked in {best}): train it first "
        f"({command}) or pass --checkpoint last|PATH"
    )
    # The command trains this run: MODEL= is the config, the run's name= is among the ARGS.
    words = shlex.split(command)
    assert words[:3] == ["make", "train", f"MODEL={model}"]
    named = load_config(model, shlex.split(words[3].removeprefix("ARGS=")))
    assert run_dir(named) == best.parent.parent


def test_a_run_started_from_another_folder_says_where_it_looked(tmp_path):
    proc = run_command("-m", "train", "demo_resnet18", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    [line] = errors(proc.stderr)
    assert line.startswith(
        f"error: data/fashion50/manifest.json is missing (looked in {tmp_path}/data/fashion50: "
        f"a relative path starts at the current folder, not at the project {ROOT}); "
    )
    assert str(ROOT) in line.split("); ", 1)[1]
    assert list(tmp_path.iterdir()) == []  # no runs/ folder made in the wrong place


@pytest.mark.parametrize(
    ("module", "head"),  # a smaller head fails mid-epoch; a larger one trains outputs for nothing
    [("train", 4), ("train", 12), ("ensemble.logits", 12)],
)
def test_a_head_of_another_size_than_the_datasets_classes_is_refused_before_any_work(
    tiny_dir, tmp_path, module, head
):
    args = args_for(tiny_dir, tmp_path, f"num_classes={head}")
    proc = run_command("-m", module, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert errors(proc.stderr) == [
        f"error: {tiny_dir}/manifest.json lists 10 classes but num_classes={head}; "
        "pass data=<the dataset config> or num_classes="
    ]
    assert list(tmp_path.iterdir()) == []  # no run folder


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("opt=adamm", "opt='adamm': Optimizer adamm not found in registry; use one of timm's"),
        ("auto_augment=orignal", "auto_augment='orignal' is not a policy timm knows"),
    ],
)
def test_a_name_only_timm_knows_misspelt_is_one_line(tiny_dir, tmp_path, override, message):
    proc = run_command("-m", "train", *args_for(tiny_dir, tmp_path, override), check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = errors(proc.stderr)
    assert line.startswith(f"error: {message}") and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder holding only its lock


@pytest.mark.parametrize(
    ("argv", "place", "fix"),
    [
        (["train", "demo_resnet18", "out_dir={}"], "{}/demo_resnet18", "pass out_dir= a folder"),
        (["ensemble.logits", "demo_resnet18", "logits_dir={}"], "{}/demo_resnet18", "logits_dir="),
        (["ensemble.blend", "--models", "a", "--out-dir", "{}"], "{}", "pass --out-dir a folder"),
        (["data_prep", "fashion", "--out", "{}"], "{}", "choose another --out"),
    ],
)
def test_an_output_place_that_cannot_be_written_is_refused_before_any_work(
    tiny_dir, tmp_path, argv, place, fix
):
    blocker = tmp_path / "a_file"  # a file where a folder must go: refused for root users too
    blocker.write_text("")
    out = blocker / "out"
    args = [a.format(out) for a in argv] + (["data_dir=" + str(tiny_dir)] if "=" in argv[2] else [])
    proc = run_command("-m", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {place.format(out)}: {blocker} is a file, not a folder")
    assert fix in proc.stderr and proc.stderr.count("\n") == 1


def test_a_resume_or_logits_on_another_dataset_are_refused_and_on_the_same_one_moved_are_not(
    tiny_dir, tmp_path
):
    other = tmp_path / "other"  # the same classes, another draw of their images
    prep = ["-m", "data_prep", "folder", "--root", str(tiny_dir / "train"), "--per-class", "5,2,1"]
    run_command(*prep, "--out", str(other))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dir, moved)
    out = tmp_path / "runs"
    run_command("-m", "train", *args_for(tiny_dir, out, "epochs=1"))
    refused = run_command("-m", "train", *args_for(other, out, "epochs=1"), check=False)
    assert refused.returncode == 2, refused.stderr
    [line] = errors(refused.stderr)
    assert line.startswith(f"error: {other} is not the dataset run {out}/demo_resnet18 trained on")
    assert "cannot resume on it" in line
    logits, to = ["-m", "ensemble.logits", "--center-crop"], f"logits_dir={tmp_path / 'logits'}"
    refused = run_command(*logits, *args_for(other, out, to), check=False)  # other images
    assert refused.returncode == 2, refused.stderr
    [line] = errors(refused.stderr)
    assert "is not the dataset run" in line and "cannot predict on it" in line
    run_command(*logits, *args_for(moved, out, to))  # the same images, moved: accepted
    # A change allowed once stands: later resumes and logits check against the newest dataset.
    run_command("-m", "train", *args_for(other, out, "epochs=1", "allow_config_change=true"))
    refused = run_command(*logits, *args_for(moved, out, to), check=False)  # not the saved flag's
    assert refused.returncode == 2 and "cannot predict on it" in refused.stderr
    assert "another name" not in refused.stderr  # a fix for a training command only


def test_seeding_fixes_every_generator_a_checkpoint_snapshots():
    """numpy's and Python's generators too: two identical runs write identical rng_rank*.pt."""
    import random

    import numpy as np
    import torch

    from train.rng import rng_state, seed_everything

    snapshots = []
    for _ in range(2):
        seed_everything(2**40 + 7)  # a seed past numpy's 32 bits
        snapshots.append(rng_state())
        random.random(), np.random.random(), torch.rand(1)  # what a run may draw afterwards
    first, second = snapshots
    assert torch.equal(first["torch"], second["torch"])
    assert first["python"] == second["python"]
    assert torch.equal(first["numpy"][1], second["numpy"][1])


def test_a_run_started_in_process_gives_back_the_signals_it_took(tiny_dir, tmp_path):
    """train() from Python (a notebook, a sweep driver, this suite) restores the handlers and
    the wake-up fd it found and ends its watchdog: afterwards SIGTERM reaches our own handler."""
    from train.config import load_config
    from train.run import train

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    wakeup_fd = signal.set_wakeup_fd(-1)  # read it: setting returns the previous one
    signal.set_wakeup_fd(wakeup_fd)
    # workers=1: the forked loader process holds copies of the watchdog's pipe
    cfg = load_config(RUN[0], [*args_for(tiny_dir, tmp_path, "epochs=1", "workers=1")[1:]])
    assert train(cfg) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(wakeup_fd) == wakeup_fd  # the one found before the run
    assert not [t for t in threading.enumerate() if t.name == "stop"]
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # Python runs the handler at the next bytecode boundary
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]


def test_closing_a_stop_request_after_a_stop_signal_cancels_its_clock():
    """The run checkpointed in time and closed the request: the watchdog must not exit later."""
    from train.stop import StopRequest

    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest(timeout_s=0.5) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert stop.requested
    time.sleep(1.0)  # beyond timeout_s: still alive, and the handler given back
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert not stop._watchdog.is_alive()


def python_code(code: str) -> tuple[subprocess.CompletedProcess, float]:
    """`code` run by a fresh interpreter from the repository (signals of its own to take), and
    the seconds it took."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize("stopped", ["during the run", "before the run"])
def test_a_run_s_request_closed_after_a_stop_hands_its_clock_to_the_enclosing_one(stopped):
    """`python -m train` after its run returned: a tracker's flush that hangs, or the next
    `batch_size: auto` attempt, is held to the stop's deadline, not left without one (when
    the outer clock already runs too: the sooner deadline)."""
    stop = "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1)\n"
    code = (
        "import os, signal, time\n"
        "from train.stop import StopRequest\n"
        "outer = StopRequest(timeout_s=60)\n"
        + (stop if stopped == "before the run" else "")
        + "run = StopRequest(timeout_s=0.5)\n"
        + (stop if stopped == "during the run" else "")
        + "run.close()\n"
        "time.sleep(30)  # hangs after the run\n"
    )
    proc, seconds = python_code(code)
    assert proc.returncode == 75, proc.stderr
    assert proc.stderr.startswith("error: the process did not end within stop_timeout_s=0.5 s")
    assert seconds < 15  # the run's 0.5 s, not the outer's 60 or the sleep


def test_a_first_ctrl_c_is_a_stop_and_a_second_one_interrupts_at_once(capfd):
    from train.stop import CTRL_C, StopRequest

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopRequest(timeout_s=60) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested and capfd.readouterr().err == f"\n{CTRL_C}\n"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises long before
    assert signal.getsignal(signal.SIGINT) == previous


def test_a_second_ctrl_c_ends_a_process_whose_main_thread_cannot_take_it():
    """The main thread blocked in C (a hung collective): the watchdog reads the second Ctrl-C
    from the wake-up pipe, where the C-level handler writes it, and ends the process."""
    code = (
        "import os, signal, time\n"
        "from train import stop as module\n"
        "module.GRACE_S = 0.5  # (10 s by default)\n"
        "stop = module.StopRequest(timeout_s=60)\n"
        "for _ in range(2):  # what the C-level handler writes; no Python handler ever runs\n"
        "    os.write(stop._write_fd, bytes([signal.SIGINT])); time.sleep(0.3)\n"
        "time.sleep(60)\n"
    )
    proc, seconds = python_code(code)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "Ctrl-C again: quitting without a checkpoint\n"
    assert seconds < 30


@pytest.mark.slow
@pytest.mark.parametrize("module", ["train", "train.launch"])
def test_ctrl_c_in_a_terminal_checkpoints_and_exits_75_in_one_line(data, tmp_path, module):
    from train.stop import CTRL_C

    proc = start(args_for(data, tmp_path, "epochs=3", "workers=1"), module=module)
    run = tmp_path / "demo_resnet18"
    wait_for(lambda: any((run / "checkpoints").glob("step_*")), proc)  # in the loop
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
    code, out, err = finish(proc)
    assert code == 75, out + err
    assert CTRL_C in err and "Traceback" not in err and errors(err) == []
    assert re.search(r"stopped on request; checkpoint at step \d+", out)


def test_a_stop_before_the_run_marks_the_next_request_and_starts_its_clock():
    """`python -m train` holds a request around the run: a stop that comes before the run's own
    request exists (train.launch relays one as soon as the process catches it) is not lost; the
    run's request starts stopped, with its clock running, and torch is not imported for it."""
    code = (
        "import os, signal, sys, time\n"
        "from train.stop import StopRequest\n"
        "outer = StopRequest(timeout_s=60)\n"
        "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1)\n"
        "run = StopRequest(timeout_s=0.3)\n"
        "print(outer.requested, run.requested, 'torch' in sys.modules, flush=True)\n"
        "time.sleep(60)  # never closed: the run's watchdog ends the process\n"
    )
    proc, _ = python_code(code)
    assert proc.stdout.split() == ["True", "True", "False"]
    assert proc.returncode == 75 and "no checkpoint within stop_timeout_s=0.3 s" in proc.stderr

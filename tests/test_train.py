"""Training runs through the real commands: exact resume, preemption, two processes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserError
from tests.conftest import NARROW, ROOT, run_command

pytestmark = pytest.mark.slow

# 80 training images, batch 8: 10 steps an epoch, 20 in all; a checkpoint every 3 steps.
RUN_ARGS = [
    "demo_resnet18",
    NARROW,
    "epochs=2",
    "batch_size=8",
    "workers=1",
    "ckpt_every_steps=3",
    "ckpt_every_minutes=0",
    "keep_last=50",
    "eval_every=1",
    "warmup_epochs=1",
    "lr=0.05",
    "train_splits=[train]",
]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*RUN_ARGS, f"data_dir={data}", f"out_dir={out}", *extra]


def start(args: list[str], module: str = "train") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def newest_step(run: Path) -> int:
    steps = [
        int(p.name[5:14])
        for p in (run / "checkpoints").glob("step_*")
        if p.is_dir() and (p / "COMPLETE").is_file() and p.suffix != ".tmp"  # sealed, in place
    ]
    return max(steps, default=-1)


def killed_at(data: Path, out: Path, step: int) -> Path:
    """Start a run in `out`, SIGKILL it once checkpoint `step` or a later one is sealed, and
    return its newest checkpoint folder."""
    proc = start(train_args(data, out))
    run = out / "demo_resnet18"
    while newest_step(run) < step and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return run / "checkpoints" / f"step_{newest_step(run):09d}"


def final_state(run: Path) -> dict[str, dict]:
    last = sorted((run / "checkpoints").glob("step_000000020"))[0]
    state = torch.load(last / "state.pt", weights_only=True)
    return {
        "student": load_file(last / "student.safetensors"),
        "teacher": load_file(last / "teacher.safetensors"),
        "optimizer": state["optimizer"]["state"],
        "rng": torch.load(last / "rng_rank0.pt", weights_only=True),
    }


def assert_bit_identical(a: dict, b: dict) -> None:
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for pid, slots in a["optimizer"].items():
        for name, value in slots.items():
            other = b["optimizer"][pid][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"opt {pid}.{name}"
    # torch's, Python's and numpy's generators, as the checkpoint snapshots them: all seeded.
    assert a["rng"].keys() == b["rng"].keys() == {"torch", "python", "numpy"}
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["python"] == b["rng"]["python"]
    name, keys, *rest = a["rng"]["numpy"]
    assert [name, *rest] == [b["rng"]["numpy"][0], *b["rng"]["numpy"][2:]]
    assert torch.equal(keys, b["rng"]["numpy"][1])


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, module_dir) -> Path:
    run_command("-m", "train", *train_args(tiny_dir, module_dir))
    return module_dir / "demo_resnet18"


def test_a_resume_with_another_number_of_processes_is_refused_in_one_line(
    uninterrupted, tiny_dir, tmp_path
):
    """Its restored learning-rate schedule counts the steps of the old global batch (on half the
    processes it reached 0 with 39% of the epochs to go) and the data order is per process."""
    shutil.copytree(uninterrupted, tmp_path / "demo_resnet18")
    newest = max((tmp_path / "demo_resnet18" / "checkpoints").glob("step_*"))
    marker = json.loads((newest / "COMPLETE").read_text())
    shutil.copy(newest / "rng_rank0.pt", newest / "rng_rank1.pt")  # as two processes write
    files = {**marker["files"], "rng_rank1.pt": marker["files"]["rng_rank0.pt"]}
    (newest / "COMPLETE").write_text(json.dumps({**marker, "world_size": 2, "files": files}))
    proc = run_command("-m", "train", *train_args(tiny_dir, tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {newest} was written by 2 processes and this run has 1; resume with 2 (NPROC=, "
        "or that many GPUs visible), or use another name= (allow_config_change=true resumes "
        "anyway: schedule and position as saved)"
    )


def test_an_uninterrupted_run_writes_config_metrics_curves_and_checkpoints(uninterrupted):
    metrics = pd.read_csv(uninterrupted / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    for column in (
        "loss",
        "ce",
        "rce",
        "cr",
        "mt",
        "aux",
        "lr",
        "img_per_s",
        "heldout_images",
        "heldout_student",
        "heldout_teacher",
        "heldout_fused",
        "fusion_w",
    ):
        assert metrics[column].notna().all(), column
    assert (metrics["cr"] > 0).all() and (metrics["mt"] > 0).all()
    assert (uninterrupted / "curves.png").stat().st_size > 1000
    assert (uninterrupted / "config.yaml").is_file()
    assert (uninterrupted / "checkpoints" / "best" / "COMPLETE").is_file()
    # Written atomically, yet with the mode open() gives a new file under the suite's umask 022
    # (tests/conftest.py), not mkstemp's 0600, which hid runs from a group's other members.
    written = [p for p in uninterrupted.rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}


def test_a_run_killed_at_a_random_step_resumes_bit_identical(uninterrupted, tiny_dir, tmp_path):
    kill_after = random.Random(os.getpid()).randrange(3, 18)
    killed_at(tiny_dir, tmp_path, kill_after)
    run = tmp_path / "demo_resnet18"
    assert newest_step(run) < 20, "the run finished before it was killed"
    resumed = run_command("-m", "train", *train_args(tiny_dir, tmp_path))
    assert "resumed from" in resumed.stdout
    assert_bit_identical(final_state(uninterrupted), final_state(run))
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_how_often_a_run_is_evaluated_never_changes_the_weights_it_computes(
    uninterrupted, tiny_dir, tmp_path
):
    """eval_every is resume-neutral (train/run.py): the held-out pass after epoch 1, which this
    run skips, must not move the generator that dropout and the CPU's erasing draw from."""
    run_command("-m", "train", *train_args(tiny_dir, tmp_path, "eval_every=2"))
    run = tmp_path / "demo_resnet18"
    assert pd.read_csv(run / "metrics.csv")["heldout_student"].isna().tolist() == [True, False]
    assert_bit_identical(final_state(uninterrupted), final_state(run))


def test_a_kill_between_an_improved_epoch_s_save_and_its_best_mark_is_repaired_by_the_resume(
    uninterrupted, tiny_dir, tmp_path
):
    """The state such a kill leaves: the newest checkpoint is the epoch that improved, `best`
    still the epoch before (at the first improved epoch, no `best` at all)."""
    metrics = pd.read_csv(uninterrupted / "metrics.csv")
    best_step = int(metrics.loc[metrics["heldout_teacher"].idxmax(), "step"])
    for earlier in ("step_000000010", None):
        run = tmp_path / str(earlier) / "demo_resnet18"
        shutil.copytree(uninterrupted, run)
        checkpoints = run / "checkpoints"
        shutil.rmtree(checkpoints / "best")
        if earlier:
            shutil.copytree(checkpoints / earlier, checkpoints / "best")
        else:  # killed at epoch 1's end: nothing marked yet, nothing after it saved
            for late in checkpoints.glob("step_*"):
                if int(late.name[5:]) > 10:
                    shutil.rmtree(late)
        run_command("-m", "train", *train_args(tiny_dir, run.parent))
        marked = json.loads((checkpoints / "best" / "COMPLETE").read_text())["step"]
        assert marked == best_step, earlier


def as_written_on_a_gpu(step_dir: Path) -> None:
    """Rewrite the checkpoint's state.pt as a GPU run leaves it, its optimiser state's storages
    tagged cuda:0 (the pickle's location strings), and reseal the marker's checksum."""
    path = step_dir / "state.pt"
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"X\x03\x00\x00\x00cpu") >= 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            archive.writestr(info, data)
    marker = json.loads((step_dir / "COMPLETE").read_text())
    marker["files"]["state.pt"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (step_dir / "COMPLETE").write_text(json.dumps(marker))


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu_bit_identical(
    uninterrupted, tiny_dir, tmp_path
):
    newest = killed_at(tiny_dir, tmp_path, 3)
    as_written_on_a_gpu(newest)
    if not torch.cuda.is_available():  # what a plain torch.load makes of it on this machine
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(newest / "state.pt", weights_only=True)
    resumed = run_command("-m", "train", *train_args(tiny_dir, tmp_path))
    assert f"resumed from {newest}" in resumed.stdout
    assert_bit_identical(final_state(uninterrupted), final_state(tmp_path / "demo_resnet18"))


def test_a_kill_while_a_checkpoint_is_written_resumes_bit_identical(
    uninterrupted, tiny_dir, tmp_path
):
    proc = start(train_args(tiny_dir, tmp_path))
    ckpts = tmp_path / "demo_resnet18" / "checkpoints"
    # Poll fast for a folder still being assembled; kill the moment one is seen.
    while proc.poll() is None and not any(p.name.endswith(".tmp") for p in ckpts.glob("step_*")):
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    partial = [p for p in ckpts.glob("step_*.tmp")]
    assert partial, "the kill did not land inside a checkpoint write"
    run_command("-m", "train", *train_args(tiny_dir, tmp_path))
    assert_bit_identical(final_state(uninterrupted), final_state(tmp_path / "demo_resnet18"))


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(uninterrupted, tiny_dir, tmp_path):
    newest = killed_at(tiny_dir, tmp_path, 9)
    weights = newest / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, marker still present
    resumed = run_command("-m", "train", *train_args(tiny_dir, tmp_path))
    assert "incomplete or corrupt" in resumed.stderr
    assert_bit_identical(final_state(uninterrupted), final_state(tmp_path / "demo_resnet18"))


def test_sigterm_checkpoints_exits_75_and_the_rerun_continues(uninterrupted, tiny_dir, tmp_path):
    args = train_args(tiny_dir, tmp_path)
    proc = start(args, module="train.launch")  # the make train path: accelerate launch
    run = tmp_path / "demo_resnet18"
    while newest_step(run) < 4 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output
    assert "stopped on request" in output
    stopped_at = newest_step(run)
    assert 4 <= stopped_at < 20
    resumed = run_command("-m", "train.launch", *args)
    assert f"step {stopped_at})" in resumed.stdout
    assert_bit_identical(final_state(uninterrupted), final_state(run))


STOP_IN_EVALUATION = """
import os, signal, sys
import train.run as run

predict = run.predict_crops_of

def stopped_once_then_predict(*args, **kwargs):
    if not os.environ.get("STOPPED"):
        os.environ["STOPPED"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's stop during epoch 1's evaluation
    return predict(*args, **kwargs)

run.predict_crops_of = stopped_once_then_predict
from train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_during_the_evaluation_checkpoints_before_it_and_the_rerun_redoes_it(
    uninterrupted, tiny_dir, tmp_path
):
    """A held-out pass can outlast stop_timeout_s (50,000 val images at B7 on one GPU): it ends
    at the next batch, the epoch is saved unfinished, and the rerun evaluates it as if never
    stopped."""
    args = train_args(tiny_dir, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", STOP_IN_EVALUATION, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "stopped on request; checkpoint at step 10" in proc.stdout
    run = tmp_path / "demo_resnet18"
    state = torch.load(run / "checkpoints" / "step_000000010" / "state.pt", weights_only=True)
    assert state["position"] == [0, 10, 10] and state["history"] == []  # epoch 1 not ended
    run_command("-m", "train", *args)
    assert_bit_identical(final_state(uninterrupted), final_state(run))
    assert math.isnan(pd.read_csv(run / "metrics.csv")["img_per_s"].iloc[0])  # no images trained
    columns = ["heldout_student", "heldout_teacher", "loss"]
    assert pd.read_csv(run / "metrics.csv")[columns].equals(
        pd.read_csv(uninterrupted / "metrics.csv")[columns]
    )


def test_a_kill_between_a_checkpoint_s_two_renames_is_repaired_by_the_resume(
    uninterrupted, tiny_dir, tmp_path
):
    """Killed after sealing step 20 before its rename, and between `best`'s two renames."""
    run = tmp_path / "demo_resnet18"
    shutil.copytree(uninterrupted, run)
    ckpts = run / "checkpoints"
    (ckpts / "step_000000020").rename(ckpts / "step_000000020.tmp")
    (ckpts / "best").rename(ckpts / "best.old")
    resumed = run_command("-m", "train", *train_args(tiny_dir, tmp_path))
    assert f"resumed from {ckpts / 'step_000000020'} (epoch 2, step 20)" in resumed.stdout
    names = {p.name for p in ckpts.iterdir()}
    assert {"best", "step_000000020"} <= names and not any("." in n for n in names)
    assert_bit_identical(final_state(uninterrupted), final_state(run))
    (run / "metrics.csv").write_text("epoch\n1\n")  # killed before its last epoch's row
    run_command("-m", "train", *train_args(tiny_dir, tmp_path))
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.parametrize("module", ["ensemble.logits", "train"])
def test_weights_of_another_shape_are_one_line_naming_the_checkpoint(
    uninterrupted, tiny_dir, tmp_path, module
):
    out = tmp_path / "copy"  # the shared run stays as it is
    shutil.copytree(uninterrupted, out / uninterrupted.name)
    changed = [*train_args(tiny_dir, out), "arch=resnet34"]
    if module == "train":  # a resume, the change allowed: the weights cannot follow it
        changed.append("allow_config_change=true")
    else:
        changed.append(f"logits_dir={tmp_path / 'logits'}")
    proc = run_command("-m", module, *changed, check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = [text for text in proc.stderr.splitlines() if text.startswith("error:")]
    assert f"{out / uninterrupted.name}" in line and "holds a model of another shape" in line
    assert line.endswith("pass the arch= and num_classes= it was trained with")


def test_a_checkpoint_of_another_config_is_refused(uninterrupted, tiny_dir, tmp_path):
    out = uninterrupted.parent
    proc = run_command("-m", "train", *train_args(tiny_dir, out, "cr_weight=0.5"), check=False)
    assert proc.returncode == 2
    assert "different config (cr_weight)" in proc.stderr and "allow_config_change" in proc.stderr


def test_a_world_size_the_accelerator_does_not_see_is_refused(monkeypatch):
    """The launcher says two processes; an Accelerator that sees one must not train alone."""
    import train.distributed as distributed

    class OneProcess:
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(distributed, "Accelerator", OneProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"WORLD_SIZE=2 .* sees 1.*--multi_gpu"):
        distributed.make_accelerator("no")


def test_fewer_held_out_images_than_processes_are_refused_in_one_line():
    """A process with no held-out image would never join the DDP student's first evaluation
    forward (a buffer broadcast): the others would wait for it until the group's timeout."""
    from train.run import check_eval_shares

    for images, world in ((0, 8), (2, 2), (9, 8), (1, 1)):
        check_eval_shares(images, world)  # none held out (nothing evaluated), or a share each
    with pytest.raises(UserError, match=r"^1 held-out image\(s\) for 2 processes: .*; hold out"):
        check_eval_shares(1, 2)


def test_two_cpu_processes_validate_like_one_process(tiny_dir, tmp_path):
    # CR in feature space: its projector trains through the loss alone (the step hands the
    # loss logits only), which DistributedDataParallel must accept as well.
    args = train_args(tiny_dir, tmp_path, "epochs=1", "batch_size=4", "cr_space=features")
    out = run_command("-m", "train.launch", "--num_processes", "2", *args)
    assert "world size 2" in out.stdout
    run = tmp_path / "demo_resnet18"
    logged = pd.read_csv(run / "metrics.csv").iloc[-1]
    # One process, the same weights, every val image once.
    from common.metrics import top1
    from data_prep.layout import Layout
    from train.config import load_config
    from train.data import eval_loader
    from train.distributed import make_accelerator
    from train.inference import predict_crops
    from train.model import build_model

    cfg = load_config(args[0], args[1:])
    model = build_model(cfg)
    weights = load_file(run / "checkpoints" / "best" / "student.safetensors")
    assert any(key.startswith("projector.") for key in weights)
    model.load_state_dict(weights)
    items = Layout(tiny_dir).split_items("val")
    acc = make_accelerator("no")
    loader = eval_loader(cfg, items, 0, 1, 7)
    probs = predict_crops(acc, model.eval(), loader, len(items), 10, True, False)["main"]
    labels = torch.tensor([item[2] for item in items])
    assert probs.shape[0] == len(items)
    assert top1(probs, labels) == pytest.approx(logged["heldout_student"], abs=1e-4)


def test_an_evaluation_loader_starts_no_more_workers_than_it_has_batches(tiny_dir):
    from data_prep.layout import Layout
    from train.config import load_config
    from train.data import eval_loader

    items = Layout(tiny_dir).split_items("val")  # 30 images
    cfg = load_config("demo_resnet18", [f"data_dir={tiny_dir}", "workers=2"])
    assert eval_loader(cfg, items, 0, 1, 16).num_workers == 2  # ceil(30 / 16) batches
    assert eval_loader(cfg, items, 0, 1, 30).num_workers == 1
    assert eval_loader(cfg, items, 1, 2, 16).num_workers == 1  # this process's 15 images


def test_a_holdout_that_would_take_every_image_of_a_class_names_the_key_and_the_class(tiny_dir):
    from train.config import load_config
    from train.data import split_train_eval

    both = [f"data_dir={tiny_dir}", "train_splits=[train,val]"]  # 8 + 3 images per class
    keep, held = split_train_eval(load_config("demo_resnet18", [*both, "holdout_per_class=10"]))
    assert (len(keep), len(held)) == (10, 100)
    with pytest.raises(UserError, match=r"^holdout_per_class=11 holds out all 11 train\+val "):
        split_train_eval(load_config("demo_resnet18", [*both, "holdout_per_class=11"]))
    twice = [f"data_dir={tiny_dir}", "train_splits=[train,train]"]
    with pytest.raises(UserError, match=r"use \[train\] or \[train, val\]"):
        split_train_eval(load_config("demo_resnet18", twice))


def test_checkpoints_follow_the_clock_not_every_epoch(tiny_dir, tmp_path):
    def saved_steps(minutes: str) -> list[int]:
        out = tmp_path / minutes
        run_command("-m", "train", *train_args(tiny_dir, out, "ckpt_every_steps=0", minutes))
        root = out / "demo_resnet18" / "checkpoints"
        steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if (p / "COMPLETE").is_file())
        shutil.rmtree(out)  # 20 checkpoints of a ResNet-18 are 2.7 GB: free them at once
        return steps

    # Nothing due by time: the first epoch (the best so far) and the last are saved, no more.
    assert saved_steps("ckpt_every_minutes=0") == [10, 20]
    # Always due: a checkpoint at every optimiser step.
    assert saved_steps("ckpt_every_minutes=0.00001") == list(range(1, 21))

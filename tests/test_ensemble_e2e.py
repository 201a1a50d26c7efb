"""`make logits` -> `make ensemble` -> `make evaluate` through the real commands on tiny data.

A 3-class dataset of odd-sized PNGs is built by `python -m data_prep folder`; two runs get
randomly initialised checkpoints written by the real `train.checkpoint` functions (student and
teacher differ), with their resolved configs saved as training saves them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common import provenance
from common.errors import UserError
from data_prep.layout import Layout, dataset_files, tree_checksum
from tests.conftest import ROOT, run_command
from tests.test_logits import explicit_ten_crops, softmax64
from train.checkpoint import load_weights
from train.config import load_config, read_provenance
from train.data import split_train_eval
from train.inference import fuse
from train.model import build_model

TINY = {
    "arch": "resnet18",
    "data": "fashion50",
    "num_classes": 3,
    "drop_path_rate": 0.0,
    "batch_size": 4,
    "workers": 0,
    "test_size": 16,
    "test_resize_ratio": 0.8,
}

MAKE_RUNS = """
import json, sys, torch
from train.checkpoint import mark_best, save_checkpoint
from train.config import load_config, run_dir, save_config
from train.distributed import make_accelerator
from train.model import build_model
accelerator = make_accelerator()
for model, overrides in json.loads(sys.argv[1]):
    cfg = load_config(model, overrides)
    torch.manual_seed(cfg["seed"])
    weights = {role: build_model(cfg).state_dict() for role in ("student", "teacher")}
    save_config(cfg, run_dir(cfg) / "config.yaml")
    step = save_checkpoint(accelerator, run_dir(cfg), 1, weights, {"random_init": True}, 1)
    mark_best(run_dir(cfg), step)
"""


@pytest.fixture(scope="module")
def world(module_dir):
    """Paths of the tiny dataset, the model config and the runs (seeds 0 and 1)."""
    base = module_dir
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        (base / "src" / name).mkdir(parents=True)
        for i in range(7):
            height, width = rng.integers(14, 40, size=2)
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "src" / name / f"{name}_{i}.png")
    run_command(
        "-m",
        "data_prep",
        "folder",
        "--root",
        str(base / "src"),
        "--per-class",
        "2,3,2",
        "--out",
        str(base / "data"),
        "--mode",
        "copy",
        "--workers",
        "1",
    )
    (base / "tiny.yaml").write_text(json.dumps(TINY))
    paths = {"base": base, "data": base / "data", "model": str(base / "tiny.yaml")}
    runs = [[paths["model"], [f"name=tiny_{s}", f"seed={s}", *common(paths)]] for s in (0, 1)]
    run_command("-c", MAKE_RUNS, json.dumps(runs))
    return paths


def common(paths: dict, logits: str = "logits") -> list[str]:
    base = paths["base"]
    return [f"data_dir={paths['data']}", f"out_dir={base / 'runs'}", f"logits_dir={base / logits}"]


def logits_command(paths: dict, name: str, *extra: str, logits: str = "logits", check=True):
    return run_command(
        "-m",
        "ensemble.logits",
        paths["model"],
        f"name={name}",
        *common(paths, logits),
        *extra,
        check=check,
    )


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def logits_0(world):
    proc = logits_command(world, "tiny_0")
    return world["base"] / "logits" / "tiny_0", proc


def test_logits_writes_one_row_per_image_in_id_order(world, logits_0):
    folder, proc = logits_0
    layout = Layout(world["data"])
    val, test = load(folder / "val.npz"), load(folder / "test.npz")
    assert val["ids"].tolist() == [item[0] for item in layout.split_items("val")]
    assert val["labels"].tolist() == [item[2] for item in layout.split_items("val")]
    assert test["ids"].tolist() == [f"img_{i}.png" for i in range(6)]
    assert val["ids"].dtype.kind == "U" and val["probs"].dtype == np.float16
    assert val["probs"].shape == (9, 3) and test["probs"].shape == (6, 3)
    np.testing.assert_allclose(test["probs"].astype(np.float64).sum(1), 1.0, atol=3e-3)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["rows"] == {"val": 9, "test": 6} and meta["view"] == "tencrop"
    assert meta["probs_dtype"] == "float16"
    assert meta["role"] == "teacher" and meta["checkpoint"] == "best"
    # trained on train+val with nothing held out: nothing to choose the weight on
    assert meta["resize_size"] == 20 and meta["heldout_split"] is None
    assert meta["fusion_weight_from"] == "fusion_fallback (no held-out images)"
    fallback = load_config(str(world["base"] / "runs" / "tiny_0" / "config.yaml"))[
        "fusion_fallback"
    ]
    assert meta["fusion_weight"] == fallback and meta["fusion_weight_chosen_on"] is None
    assert not (folder / "holdout.npz").exists()
    right = (val["probs"].astype(np.float32).argmax(1) == val["labels"]).mean()
    scores = meta["scores"]["val"]
    assert scores["top1"] == pytest.approx(100.0 * right) == scores["top1_tencrop"]
    assert scores["top1_center"] is not None and scores["trained_on"] is True
    assert scores["images"] == 9 and list(meta["scores"]) == ["val"]
    assert "tiny_0: no held-out images; val top-1" in proc.stdout
    assert (
        "(trained on)" in proc.stdout
        and f"fusion weight {fallback} (fusion_fallback" in proc.stdout
    )


def test_float32_keeps_the_probabilities_the_float16_files_round(world, logits_0):
    """`--float32` (make gpu-check's agreement: float16 steps are 2.4e-4 at p = 0.25-0.5)."""
    logits_command(world, "tiny_0", "--float32", logits="logits32")
    folder = world["base"] / "logits32" / "tiny_0"
    for split in ("val", "test"):
        wide, narrow = load(folder / f"{split}.npz"), load(logits_0[0] / f"{split}.npz")
        assert wide["probs"].dtype == np.float32
        np.testing.assert_array_equal(wide["probs"].astype(np.float16), narrow["probs"])
    assert json.loads((folder / "meta.json").read_text())["probs_dtype"] == "float32"


def test_logits_rows_equal_an_explicit_tencrop_of_the_teacher(world, logits_0):
    folder, _ = logits_0
    meta = json.loads((folder / "meta.json").read_text())
    cfg = load_config(str(world["base"] / "runs" / "tiny_0" / "config.yaml"))
    model = build_model(cfg)
    model.load_state_dict(load_weights(world["base"] / "runs" / "tiny_0", "best", "teacher"))
    model.eval()
    assert cfg["interpolation"] == "bilinear"  # as explicit_ten_crops resizes
    test = load(folder / "test.npz")
    for row in (0, 4):
        image = Image.open(world["data"] / "test" / "imgs" / f"img_{row}.png").convert("RGB")
        main, aux = np.zeros(3), np.zeros(3)
        with torch.no_grad():
            for crop in explicit_ten_crops(image, cfg):
                m, a = model(torch.tensor(crop.copy(), dtype=torch.float32).unsqueeze(0))
                main, aux = main + softmax64(m[0]) / 10, aux + softmax64(a[0]) / 10
        expected = fuse(main, aux, meta["fusion_weight"])
        np.testing.assert_allclose(test["probs"][row].astype(np.float64), expected, atol=1e-3)


def test_logits_student_and_centre_crop_options(world, logits_0):
    folder, _ = logits_0
    logits_command(world, "tiny_0", "--role", "student", "--center-crop", logits="logits_student")
    other = world["base"] / "logits_student" / "tiny_0"
    meta = json.loads((other / "meta.json").read_text())
    scores = meta["scores"]["val"]
    assert (meta["role"], meta["view"], scores["top1_tencrop"]) == ("student", "center", None)
    assert scores["top1_center"] == scores["top1"]
    teacher, student = load(folder / "test.npz"), load(other / "test.npz")
    assert teacher["ids"].tolist() == student["ids"].tolist()
    assert not np.array_equal(teacher["probs"], student["probs"])


def test_an_unreadable_test_image_stops_logits_naming_it(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "test" / "imgs" / "img_2.png").write_bytes(b"not a png")
    paths = {**world, "data": data, "base": tmp_path}
    shutil.copytree(world["base"] / "runs", tmp_path / "runs")
    proc = logits_command(paths, "tiny_0", "workers=1", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image") and "img_2.png" in last
    assert not (tmp_path / "logits" / "tiny_0" / "meta.json").exists()


def test_a_dataset_that_lost_an_image_since_its_build_is_refused_naming_the_folder(world, tmp_path):
    """The challenge scores a submission short of test rows on the rows it has: logits refuse
    a test folder that no longer holds what the manifest lists (and training a split's)."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "test" / "imgs" / "img_2.png").unlink()
    paths = {**world, "data": data, "base": tmp_path}
    shutil.copytree(world["base"] / "runs", tmp_path / "runs")
    proc = logits_command(paths, "tiny_0", "workers=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {data / 'test' / 'imgs'} holds 5 images but {data / 'manifest.json'} lists 6; "
        f"rerun `make data` to repair {data}"
    )
    assert not (tmp_path / "logits" / "tiny_0" / "meta.json").exists()
    next((data / "val" / "bee").iterdir()).unlink()
    with pytest.raises(UserError, match=r"val/bee holds 2 images but .* lists 3; rerun"):
        Layout(data).split_items("val")
    # Re-encoded in place: the count holds, the id the submission would carry does not.
    renamed = tmp_path / "renamed"
    shutil.copytree(world["data"], renamed)
    (renamed / "test" / "imgs" / "img_3.png").rename(renamed / "test" / "imgs" / "img_3.jpg")
    with pytest.raises(UserError) as err:
        Layout(renamed).test_items()
    assert str(err.value) == (
        f"{renamed / 'test' / 'imgs' / 'img_3.jpg'} is not among the test images "
        f"{renamed / 'test_labels.csv'} lists (1 such: renamed since the build?); "
        f"rerun `make data` to repair {renamed}"
    )


def test_logits_then_ensemble_then_evaluate(world, logits_0):
    logits_command(world, "tiny_1")
    base = world["base"]
    subs = base / "submissions"
    run_command(
        "-m",
        "ensemble.blend",
        "--models",
        "tiny_0",
        "tiny_1",
        "--name",
        "pair",
        "--logits-dir",
        str(base / "logits"),
        "--out-dir",
        str(subs),
    )
    tests = [
        load(base / "logits" / n / "test.npz")["probs"].astype(np.float64)
        for n in ("tiny_0", "tiny_1")
    ]
    frame = pd.read_csv(subs / "pair.csv")
    assert frame["Predictions"].tolist() == ((tests[0] + tests[1]) / 2).argmax(1).tolist()
    proc = run_command("-m", "ensemble.evaluate", str(subs / "pair.csv"))
    labels = pd.read_csv(world["data"] / "test_labels.csv")
    right = int((labels["label"].to_numpy() == frame["Predictions"].to_numpy()).sum())
    assert f"({right}/6) against {world['data'] / 'test_labels.csv'}" in proc.stdout
    # Labels of another build (its manifest's checksum not the members'): refused.
    other = base / "other_build"
    other.mkdir()
    shutil.copy(world["data"] / "test_labels.csv", other)
    (other / "manifest.json").write_text(json.dumps({"checksum": "0" * 64}))
    proc = run_command(
        "-m", "ensemble.evaluate", str(subs / "pair.csv"), "--data", str(other), check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {other / 'test_labels.csv'} belongs to {other}")


# ---- train+val runs: what the fusion weight and the ensemble weights are chosen on -------------
def train_command(paths: dict, name: str, *extra: str):
    """A real (tiny) training run: 15 train+val images, 4 per step."""
    return run_command(
        "-m",
        "train",
        paths["model"],
        f"name={name}",
        *common(paths),
        "epochs=1",
        "warmup_epochs=0",
        "ckpt_every_steps=0",
        "train_splits=[train,val]",
        *extra,
    )


@pytest.fixture(scope="module")
def held_runs(world):
    """Two train+val runs of different seeds holding out one image per class (the same images:
    one holdout_seed), each trained and predicted by the real commands; stdout of each."""
    out = {}
    for name, seed in (("held_a", 0), ("held_b", 1)):
        trained = train_command(world, name, f"seed={seed}", "holdout_per_class=1")
        out[name] = (trained.stdout, logits_command(world, name).stdout)
    return out


@pytest.mark.slow
def test_a_train_val_run_chooses_its_fusion_weight_on_its_held_out_images(world, held_runs):
    base = world["base"]
    cfg = load_config(str(base / "runs" / "held_a" / "config.yaml"))
    train_items, held = split_train_eval(cfg)
    assert len(held) == 3 and not {i[0] for i in held} & {i[0] for i in train_items}
    trained, predicted = held_runs["held_a"]
    assert "held-out (3 images): student" in trained
    metrics = pd.read_csv(base / "runs" / "held_a" / "metrics.csv")
    assert metrics["heldout_images"].tolist() == [3] and metrics["heldout_fused"].notna().all()
    folder = base / "logits" / "held_a"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["heldout_split"] == "holdout" and meta["rows"]["holdout"] == 3
    assert meta["fusion_weight_from"] == "chosen on held-out images"
    assert meta["fusion_weight_chosen_on"] == {"split": "holdout", "images": 3}
    assert meta["scores"]["holdout"]["trained_on"] is False
    assert meta["scores"]["val"]["trained_on"] is True
    holdout = load(folder / "holdout.npz")
    assert holdout["ids"].tolist() == [item[0] for item in held]
    assert holdout["labels"].tolist() == [item[2] for item in held]
    # the weight is the best over the grid on exactly those images (ties: the smaller w),
    # recomputed from an explicit TenCrop of the teacher
    model = build_model(cfg)
    model.load_state_dict(load_weights(base / "runs" / "held_a", "best", "teacher"))
    model.eval()
    mains, auxes = [], []
    with torch.no_grad():
        for _, path, _ in held:
            main, aux = np.zeros(3), np.zeros(3)
            for crop in explicit_ten_crops(Image.open(path).convert("RGB"), cfg):
                m, a = model(torch.tensor(crop.copy(), dtype=torch.float32).unsqueeze(0))
                main, aux = main + softmax64(m[0]) / 10, aux + softmax64(a[0]) / 10
            mains.append(main)
            auxes.append(aux)
    labels = holdout["labels"]
    grid = [i / 20 for i in range(21)]
    right = [
        sum(
            int(np.argmax(fuse(m, a, w)) == y) for m, a, y in zip(mains, auxes, labels, strict=True)
        )
        for w in grid
    ]
    assert meta["fusion_weight"] == pytest.approx(grid[right.index(max(right))])
    expected = np.stack(
        [fuse(m, a, meta["fusion_weight"]) for m, a in zip(mains, auxes, strict=True)]
    )
    np.testing.assert_allclose(holdout["probs"].astype(np.float64), expected, atol=1e-3)
    assert "held-out top-1" in predicted and "(holdout, 3 images)" in predicted
    assert "(trained on)" in predicted and "chosen on the 3 held-out images" in predicted


@pytest.mark.slow
def test_a_train_val_run_without_held_out_images_uses_the_fixed_weight_and_its_last_epoch(world):
    base = world["base"]
    trained = train_command(
        world, "blind", "holdout_per_class=0", "epochs=2", "fusion_fallback=0.3"
    )
    assert "held-out" not in trained.stdout
    metrics = pd.read_csv(base / "runs" / "blind" / "metrics.csv")
    assert "heldout_student" not in metrics and metrics["epoch"].tolist() == [1, 2]
    checkpoints = base / "runs" / "blind" / "checkpoints"
    last = max(p for p in checkpoints.glob("step_*") if (p / "COMPLETE").is_file())
    best = checkpoints / "best"
    assert (best / "COMPLETE").read_text() == (last / "COMPLETE").read_text()
    predicted = logits_command(world, "blind").stdout
    meta = json.loads((base / "logits" / "blind" / "meta.json").read_text())
    assert (meta["fusion_weight"], meta["heldout_split"]) == (0.3, None)
    assert meta["fusion_weight_from"] == "fusion_fallback (no held-out images)"
    assert meta["fusion_weight_chosen_on"] is None and list(meta["scores"]) == ["val"]
    assert "no held-out images" in predicted and "fusion weight 0.3" in predicted


@pytest.mark.slow
def test_the_ensemble_chooses_weights_only_on_images_every_member_held_out(
    world, held_runs, logits_0
):
    base = world["base"]
    args = [
        "--logits-dir",
        str(base / "logits"),
        "--out-dir",
        str(base / "subs"),
        "--search-weights",
    ]
    run_command("-m", "ensemble.blend", "--models", "held_a", "held_b", "--name", "held", *args)
    report = json.loads((base / "subs" / "held.json").read_text())
    files = {"held_a": "holdout.npz", "held_b": "holdout.npz"}
    assert report["search"]["chosen_on"] == {"images": 3, "files": files}
    assert report["heldout"]["images"] == 3 and report["heldout"]["files"] == files
    assert report["val"]["trained_on_by"] == ["held_a", "held_b"]
    # one member held out nothing: there is no image to choose on, the weights stay equal
    proc = run_command(
        "-m", "ensemble.blend", "--models", "held_a", "tiny_0", "--name", "mixed", *args
    )
    report = json.loads((base / "subs" / "mixed.json").read_text())
    assert report["weights"] == [0.5, 0.5] and report["search"]["chosen_on"] is None
    assert report["weights_from"].startswith("equal (no search")
    assert "tiny_0 held out no images" in report["search"]["skipped"]
    assert report["heldout"] is None and "note: weights stay equal" in proc.stdout
    assert "val (9 images, trained on)" in proc.stdout


def make_logits(paths: dict, nproc: int, *args: str, check: bool = True):
    """`make logits NPROC=` as a user runs it: its launch options are the Makefile's."""
    variables = [f"PY={sys.executable}", f"NPROC={nproc}", f"MODEL={paths['model']}"]
    variables.append("ARGS=" + shlex.join(args))
    # Not a sub-make of `make test`: make[1] would name itself in the output a user never sees.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(
        ["make", "-s", "logits", *variables],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"make logits exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_two_process_logits_equal_one_process_logits_row_for_row(world):
    # One image per forward in both runs: the same batches, so CPU kernels round alike and the
    # rows must be bit-identical; shards of 5 and 4 val images test the uneven gather.
    args = ["name=tiny_1", "--batch-size", "1"]
    run_command("-m", "ensemble.logits", world["model"], *args, *common(world, "one"))
    agent_logs = set(Path(tempfile.gettempdir()).glob("torchelastic*"))
    make_logits(world, 2, *args, *common(world, "two"))
    assert set(Path(tempfile.gettempdir()).glob("torchelastic*")) == agent_logs  # none left
    one, two = world["base"] / "one" / "tiny_1", world["base"] / "two" / "tiny_1"
    for split in ("val", "test"):
        a, b = load(one / f"{split}.npz"), load(two / f"{split}.npz")
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split} {key}")
    meta_one, meta_two = (json.loads((p / "meta.json").read_text()) for p in (one, two))
    assert (meta_one.pop("processes"), meta_two.pop("processes")) == (1, 2)
    # The two runs write to different logits_dir, a key of the config its hash covers, and of
    # the command that remakes them.
    hashes = [meta["provenance"].pop("config_sha256") for meta in (meta_one, meta_two)]
    remakes = [meta.pop("make_logits") for meta in (meta_one, meta_two)]
    assert remakes[0].replace("/one", "/two") == remakes[1]
    assert all(len(h) == 64 for h in hashes)
    assert meta_one == meta_two


@pytest.mark.slow
def test_bad_input_to_two_process_logits_is_one_line_and_exit_2(world):
    """Both processes meet it; torchrun's agent reports their failure in 40 lines unless told
    it was bad input (train/agent.py), and each would print the same line."""
    proc = make_logits(world, 2, "nosuch_key=1", *common(world, "bad"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("make: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: command line: unknown config key nosuch_key;")
    assert not (world["base"] / "bad").exists()


def test_logits_and_the_submission_record_where_every_row_came_from(world, logits_0):
    base = world["base"]
    if not (base / "logits" / "tiny_1" / "meta.json").is_file():
        logits_command(world, "tiny_1")
    subs = base / "traced"
    blend = ["--models", "tiny_0", "tiny_1", "--name", "traced", "--out-dir", str(subs)]
    run_command("-m", "ensemble.blend", *blend, "--logits-dir", str(base / "logits"))
    report = json.loads((subs / "traced.json").read_text())["provenance"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert report["git_commit"] == commit.stdout.strip() and report["warnings"] == []
    test_ids = "\n".join(f"img_{i}.png" for i in range(6)).encode()
    for name in ("tiny_0", "tiny_1"):
        record, run = report["members"][name], base / "runs" / name
        teacher = run / "checkpoints" / "best" / "teacher.safetensors"
        assert record["checkpoint_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
        assert record["training"] == read_provenance(run / "config.yaml")
        trained = load_config(str(run / "config.yaml"))
        assert record["training"]["config_sha256"] == provenance.config_hash(trained)
        assert record["dataset_checksum"] == tree_checksum(dataset_files(world["data"]))
        assert record["ids_sha256"]["test"] == hashlib.sha256(test_ids).hexdigest()
        assert record["git_commit"] == commit.stdout.strip()


def test_ensemble_refuses_logits_of_another_dataset_naming_the_members(world, logits_0, tmp_path):
    other = tmp_path / "other"  # the same images drawn with another seed: same test ids
    run_command(
        "-m",
        "data_prep",
        "folder",
        "--root",
        str(world["base"] / "src"),
        "--per-class",
        "2,3,2",
        "--seed",
        "1",
        "--out",
        str(other),
        "--mode",
        "copy",
        "--workers",
        "1",
    )
    mixed = tmp_path / "mixed"
    # Logits refuse another dataset than the run's (tests/test_train_failures.py) unless told.
    logits_command(
        {**world, "data": other}, "tiny_1", "allow_config_change=true", logits=str(mixed)
    )
    shutil.copytree(logits_0[0], mixed / "tiny_0")
    proc = run_command(
        "-m",
        "ensemble.blend",
        "--models",
        "tiny_0",
        "tiny_1",
        "--logits-dir",
        str(mixed),
        "--out-dir",
        str(tmp_path / "subs"),
        check=False,
    )
    assert proc.returncode == 2
    assert "different datasets (manifest checksum)" in proc.stderr
    assert "(tiny_0)" in proc.stderr and "(tiny_1)" in proc.stderr
    assert not (tmp_path / "subs").exists()

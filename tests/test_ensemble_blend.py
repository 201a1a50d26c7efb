"""`make ensemble` (ensemble/blend.py, members.py, search.py) on synthetic logits folders."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import zipfile

import numpy as np
import pandas as pd
import pytest
import yaml

from common.errors import UserError
from ensemble import blend
from ensemble.blend import blend_split, load_ensemble_config
from ensemble.members import SUM_TOLERANCE, open_members, write_npz
from ensemble.search import common_heldout, coordinate_ascent, search_weights
from tests.conftest import ROOT, run_command
from train.config import CONFIG_DIR

K = 4
VAL_IDS = np.array([f"c{i % K}/v{i:02d}.png" for i in range(24)])
VAL_LABELS = np.array([i % K for i in range(24)])
TEST_IDS = np.array([f"img_{i}.png" for i in range(10)])


def random_probs(rng: np.random.Generator, n: int, k: int = K) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=n).astype(np.float16)


def scores(probs, labels, trained_on: bool) -> dict:
    top1 = 100.0 * float((probs.argmax(1) == labels).mean())
    return {
        "images": len(labels),
        "trained_on": trained_on,
        "top1_tencrop": top1,
        "top1_center": top1 - 1,
    }


def make_member(
    root,
    name,
    val_probs,
    test_probs,
    *,
    val_ids=VAL_IDS,
    labels=VAL_LABELS,
    test_ids=TEST_IDS,
    holdout=None,
):
    """A `make logits` folder: by default a train-split member (val held out); with `holdout` =
    (ids, probs, labels) a train+val member that held those images out; with `holdout` = () a
    train+val member that held out nothing."""
    folder = root / name
    folder.mkdir(parents=True)
    write_npz(folder / "val.npz", ids=val_ids, probs=val_probs, labels=labels)
    write_npz(folder / "test.npz", ids=test_ids, probs=test_probs)
    meta = {"heldout_split": "val", "scores": {"val": scores(val_probs, labels, False)}}
    if holdout is not None:
        meta = {"heldout_split": None, "scores": {"val": scores(val_probs, labels, True)}}
    if holdout:
        ids, probs, held_labels = holdout
        write_npz(folder / "holdout.npz", ids=ids, probs=probs, labels=held_labels)
        meta["heldout_split"] = "holdout"
        meta["scores"]["holdout"] = scores(probs, held_labels, False)
    (folder / "meta.json").write_text(json.dumps({**meta, "data_dir": "data/x"}))
    return folder


@pytest.fixture
def three(tmp_path):
    """Three members with random probabilities; returns (root, {name: (val, test)})."""
    rng = np.random.default_rng(0)
    probs = {n: (random_probs(rng, 24), random_probs(rng, 10)) for n in ("a", "b", "c")}
    for name, (val, test) in probs.items():
        make_member(tmp_path, name, val, test)
    return tmp_path, probs


def test_identical_models_ensemble_to_the_single_model(tmp_path):
    rng = np.random.default_rng(1)
    val, test = random_probs(rng, 24), random_probs(rng, 10)
    for name in ("x", "y", "z"):
        make_member(tmp_path, name, val, test)
    members = open_members(tmp_path, ["x", "y", "z"])
    for split, probs in (("val", val), ("test", test)):
        blend = blend_split(members, [1.0, 1.0, 1.0], split)
        np.testing.assert_array_equal(blend.probs, probs.astype(np.float32))


def test_a_weight_vector_gives_the_weighted_mean_computed_by_hand(three):
    root, probs = three
    weights = [0.5, 2.0, 1.25]
    blend = blend_split(open_members(root, ["a", "b", "c"]), weights, "test")
    expected = np.zeros((10, K))
    for i in range(10):
        for k in range(K):
            num = sum(w * float(probs[n][1][i, k]) for w, n in zip(weights, "abc", strict=True))
            expected[i, k] = num / sum(weights)
    np.testing.assert_allclose(blend.probs, expected, atol=1e-6)


def test_weight_zero_drops_a_model(three):
    root, _ = three
    with_zero = blend_split(open_members(root, ["a", "b", "c"]), [1.0, 0.0, 1.0], "val")
    without = blend_split(open_members(root, ["a", "c"]), [1.0, 1.0], "val")
    np.testing.assert_array_equal(with_zero.probs, without.probs)
    assert with_zero.top1() == without.top1()


def test_val_top1_of_each_member_and_of_the_ensemble(three):
    root, probs = three
    blend = blend_split(open_members(root, ["a", "b", "c"]), [1.0, 1.0, 1.0], "val")
    for name, (val, _) in probs.items():
        right = sum(int(np.argmax(val[i].astype(np.float64)) == VAL_LABELS[i]) for i in range(24))
        assert blend.member_top1[name] == pytest.approx(100.0 * right / 24)
    mean = sum(probs[n][0].astype(np.float64) for n in "abc") / 3
    assert blend.top1() == pytest.approx(100.0 * (mean.argmax(1) == VAL_LABELS).mean())


def test_rows_are_aligned_by_id_not_by_position(tmp_path):
    rng = np.random.default_rng(2)
    val_a, test_a, val_b, test_b = (random_probs(rng, n) for n in (24, 10, 24, 10))
    make_member(tmp_path, "a", val_a, test_a)
    make_member(tmp_path, "b", val_b, test_b)
    order, test_order = rng.permutation(24), rng.permutation(10)
    make_member(
        tmp_path,
        "b_shuffled",
        val_b[order],
        test_b[test_order],
        val_ids=VAL_IDS[order],
        labels=VAL_LABELS[order],
        test_ids=TEST_IDS[test_order],
    )
    for split in ("val", "test"):
        plain = blend_split(open_members(tmp_path, ["a", "b"]), [1, 1], split)
        shuffled = blend_split(open_members(tmp_path, ["a", "b_shuffled"]), [1, 1], split)
        np.testing.assert_array_equal(plain.probs, shuffled.probs)
        np.testing.assert_array_equal(plain.ids, shuffled.ids)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"test_ids": TEST_IDS[:-1]}, "1 ids missing compared with the first model (img_9.png)"),
        ({"test_ids": np.append(TEST_IDS, "img_10.png")}, "1 ids unexpected"),
        ({"test_ids": np.array(["img_0.png"] + list(TEST_IDS[:-1]))}, "duplicate ids"),
        ({"classes": K + 1}, "5 classes where the first model has 4"),
        ({"nan": True}, "NaN or inf"),
        ({"labels": (VAL_LABELS + 1) % K}, "val labels differ from the first model's"),
    ],
)
def test_mismatched_members_are_refused(tmp_path, change, message):
    rng = np.random.default_rng(3)
    make_member(tmp_path, "good", random_probs(rng, 24), random_probs(rng, 10))
    test_ids = change.get("test_ids", TEST_IDS)
    k = change.get("classes", K)
    val, test = random_probs(rng, 24, k), random_probs(rng, len(test_ids), k)
    if change.get("nan"):
        test[3, 1] = np.nan
    make_member(
        tmp_path, "bad", val, test, test_ids=test_ids, labels=change.get("labels", VAL_LABELS)
    )
    members = open_members(tmp_path, ["good", "bad"])
    split = "val" if "labels" in change else "test"
    with pytest.raises(UserError) as err:
        blend_split(members, [1, 1], split)
    assert message in str(err.value)
    assert str(tmp_path / "bad" / f"{split}.npz") in str(err.value)


def test_a_folder_without_meta_or_with_pickled_arrays_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="run `make logits MODEL=half` first"):
        open_members(tmp_path, ["half"])
    rng = np.random.default_rng(4)
    folder = make_member(tmp_path, "pickled", random_probs(rng, 24), random_probs(rng, 10))
    np.savez(
        folder / "test.npz", ids=np.array(list(TEST_IDS), dtype=object), probs=random_probs(rng, 10)
    )
    with pytest.raises(UserError, match="cannot be read"):
        blend_split(open_members(tmp_path, ["pickled"]), [1], "test")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"heldout_split": "val", "sco', " cannot be read ("),
        ("[1, 2]", " cannot be read ("),
        ('{"heldout_split": "val"}', ': heldout_split is "val" but scores has no "val"'),
    ],
)
def test_a_damaged_meta_json_is_named_in_one_line_before_anything_is_written(
    tmp_path, text, problem
):
    rng = np.random.default_rng(5)
    folder = make_member(tmp_path, "cut", random_probs(rng, 24), random_probs(rng, 10))
    (folder / "meta.json").write_text(text)
    out = ["--logits-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]
    proc = blend_command("--models", "cut", *out, check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert f"{folder / 'meta.json'}{problem}" in line
    assert line.endswith("rerun `make logits MODEL=cut`")
    assert not list((tmp_path / "out").glob("ensemble*"))


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"provenance": "x"}, 'provenance is "x", not an object or null'),
        ({"scores": None}, "scores is null, not an object"),
        ({"scores": {"val": {"images": True}}}, "scores.val.images is true, not a number"),
        ({"scores": {"val": 3}}, "scores.val is 3, not an object"),
    ],
)
def test_a_meta_json_value_of_another_type_is_named_with_its_key(tmp_path, values, problem):
    rng = np.random.default_rng(5)
    folder = make_member(tmp_path, "edited", random_probs(rng, 24), random_probs(rng, 10))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **values}))
    with pytest.raises(UserError) as err:
        open_members(tmp_path, ["edited"])
    assert str(err.value) == (
        f"{folder / 'meta.json'}: {problem}; rerun `make logits MODEL=edited`"
    )


def test_coordinate_ascent_drops_a_confidently_wrong_model():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, K, 400)
    good = [np.eye(K)[labels] * 0.3 + rng.dirichlet(np.ones(K), 400) for _ in range(2)]
    wrong = np.eye(K)[(labels + 1) % K] * 3.0  # outvotes the others wherever it is counted
    probs = [*good, wrong]
    weights = coordinate_ascent(lambda j: probs[j].astype(np.float32), 3, labels, 0.1, 3)
    assert weights[2] == 0.0 and weights[0] > 0 and weights[1] > 0


def test_weight_search_is_kept_only_when_it_wins_on_held_out_val(tmp_path):
    rng = np.random.default_rng(6)
    n = len(VAL_LABELS)
    onehot = np.eye(K)[VAL_LABELS]
    # Two useful members, and one that is sure of a wrong class and outvotes them.
    good = [(0.35 * onehot + 0.65 * rng.dirichlet(np.ones(K), n)).astype(np.float16) for _ in "ab"]
    wrong = np.eye(K)[(VAL_LABELS + 1) % K].astype(np.float16)
    for name, val in zip(("a", "b", "wrong"), (*good, wrong), strict=True):
        make_member(tmp_path, name, val, random_probs(rng, 10))
    weights, report = search_weights(open_members(tmp_path, ["a", "b", "wrong"]))
    assert report["accepted"] and weights[2] < min(weights[:2])
    assert report["cross_validated_top1_searched"] > report["cross_validated_top1_equal"]
    assert report["chosen_on"] == {
        "images": 24,
        "files": dict.fromkeys(("a", "b", "wrong"), "val.npz"),
    }
    members = open_members(tmp_path, ["a", "b", "wrong"])
    assert blend_split(members, weights, "val").top1() > blend_split(members, [1] * 3, "val").top1()
    for name in ("c", "d", "e"):  # identical members: nothing to gain, equal weights stay
        make_member(tmp_path, name, good[0], random_probs(rng, 10))
    weights, report = search_weights(open_members(tmp_path, ["c", "d", "e"]))
    assert not report["accepted"] and weights == [1.0, 1.0, 1.0]


HELD_IDS = np.array([f"c{i % K}/h{i:02d}.png" for i in range(40)])
HELD_LABELS = np.array([i % K for i in range(40)])


def test_weights_are_chosen_on_held_out_images_never_on_the_val_the_members_trained_on(tmp_path):
    rng = np.random.default_rng(10)
    onehot_val, onehot_held = np.eye(K)[VAL_LABELS], np.eye(K)[HELD_LABELS]

    def noisy(onehot):
        return (0.35 * onehot + 0.65 * rng.dirichlet(np.ones(K), len(onehot))).astype(np.float16)

    wrong_held = np.eye(K)[(HELD_LABELS + 1) % K].astype(np.float16)
    # "memorised" is perfect on the val it trained on and sure of a wrong class on held-out
    # images: a search on val would keep it, one on the held-out images drops it.
    members = {
        "a": (noisy(onehot_val), noisy(onehot_held)),
        "b": (noisy(onehot_val), noisy(onehot_held)),
        "memorised": (np.eye(K)[VAL_LABELS].astype(np.float16), wrong_held),
    }
    for name, (val, held) in members.items():
        holdout = (HELD_IDS, held, HELD_LABELS)
        make_member(tmp_path, name, val, random_probs(rng, 10), holdout=holdout)
    weights, report = search_weights(open_members(tmp_path, list(members)))
    assert report["accepted"] and weights[2] < min(weights[:2])
    assert report["chosen_on"] == {"images": 40, "files": dict.fromkeys(members, "holdout.npz")}


@pytest.mark.parametrize(
    ("damage", "message"),
    [("nan", "probabilities hold NaN or inf"), ("x1000", "sums to"), ("twice", "duplicate ids")],
)
def test_held_out_probabilities_are_checked_as_val_and_test_are(tmp_path, damage, message):
    rng = np.random.default_rng(12)
    ids, held = HELD_IDS.copy(), random_probs(rng, 40)
    if damage == "nan":
        held[5, 1] = np.nan
    elif damage == "x1000":
        held = held * 1000
    else:
        ids[1] = ids[0]
    make_member(
        tmp_path,
        "a",
        random_probs(rng, 24),
        random_probs(rng, 10),
        holdout=(HELD_IDS, random_probs(rng, 40), HELD_LABELS),
    )
    make_member(
        tmp_path,
        "b",
        random_probs(rng, 24),
        random_probs(rng, 10),
        holdout=(ids, held, HELD_LABELS),
    )
    with pytest.raises(UserError) as err:
        search_weights(open_members(tmp_path, ["a", "b"]))
    assert str(err.value).startswith(f"{tmp_path / 'b' / 'holdout.npz'}: ")
    assert message in str(err.value)


def test_only_images_every_member_held_out_are_used_and_their_labels_must_agree(tmp_path):
    rng = np.random.default_rng(11)
    # a held out rows 0-29, b rows 10-39 (another holdout_seed), in shuffled orders
    spans = {"a": np.arange(0, 30), "b": np.arange(10, 40)[::-1]}
    for name, rows in spans.items():
        holdout = (HELD_IDS[rows], random_probs(rng, len(rows)), HELD_LABELS[rows])
        make_member(tmp_path, name, random_probs(rng, 24), random_probs(rng, 10), holdout=holdout)
    held = common_heldout(open_members(tmp_path, ["a", "b"]))
    assert sorted(held.ids.tolist()) == sorted(HELD_IDS[10:30].tolist())
    assert held.labels.tolist() == sorted(held.labels.tolist())  # ordered by class for the folds
    for j, name in enumerate(("a", "b")):
        ids = np.load(tmp_path / name / "holdout.npz")["ids"]
        assert ids[held.rows[j]].tolist() == held.ids.tolist()
    holdout = (HELD_IDS, random_probs(rng, 40), (HELD_LABELS + 1) % K)
    make_member(
        tmp_path, "relabelled", random_probs(rng, 24), random_probs(rng, 10), holdout=holdout
    )
    with pytest.raises(UserError, match="labels of shared held-out images differ"):
        common_heldout(open_members(tmp_path, ["a", "relabelled"]))
    make_member(tmp_path, "blind", random_probs(rng, 24), random_probs(rng, 10), holdout=())
    reason = common_heldout(open_members(tmp_path, ["a", "blind"]))
    assert isinstance(reason, str) and reason.startswith("blind held out no images")
    weights, report = search_weights(open_members(tmp_path, ["a", "blind"]))
    assert weights == [1.0, 1.0] and report == {
        "accepted": False,
        "skipped": reason,
        "chosen_on": None,
    }
    disjoint = (HELD_IDS[35:], random_probs(rng, 5), HELD_LABELS[35:])
    make_member(tmp_path, "late", random_probs(rng, 24), random_probs(rng, 10), holdout=disjoint)
    reason = common_heldout(open_members(tmp_path, ["a", "late"]))
    assert "no image in common" in reason and "holdout_seed" in reason


def test_ensemble_configs_name_existing_model_configs():
    paper = load_ensemble_config("vipriors16")
    assert len(paper["models"]) == 16 and "weights" not in paper
    demo = load_ensemble_config("demo")["models"]
    assert len(demo) >= 2  # an ensemble
    for name in paper["models"] + demo:
        assert (CONFIG_DIR / "models" / f"{name}.yaml").is_file(), name


def blend_command(*args, check=True):
    return run_command("-m", "ensemble.blend", *args, check=check)


def test_blend_command_writes_csv_zip_json_and_prints_the_table(three, tmp_path):
    root, probs = three
    out = tmp_path / "subs"
    proc = blend_command(
        "--models",
        "a",
        "b",
        "c",
        "--weights",
        "1",
        "2",
        "1",
        "--name",
        "abc",
        "--logits-dir",
        str(root),
        "--out-dir",
        str(out),
    )
    mean = sum(w * probs[n][1].astype(np.float64) for w, n in zip((1, 2, 1), "abc", strict=True))
    frame = pd.read_csv(out / "abc.csv")
    assert frame["Image IDs"].tolist() == TEST_IDS.tolist()
    assert frame["Predictions"].tolist() == mean.argmax(1).tolist()
    with zipfile.ZipFile(out / "abc.zip") as archive:
        assert archive.read("abc.csv") == (out / "abc.csv").read_bytes()
    report = json.loads((out / "abc.json").read_text())
    assert report["models"] == ["a", "b", "c"] and report["weights"] == [0.25, 0.5, 0.25]
    assert report["weights_from"] == "--weights" and report["num_classes"] == K
    assert set(report["val"]["top1"]["models"]) == {"a", "b", "c"}
    # train-split members: val is what every one of them held out
    assert report["val"]["trained_on_by"] == [] and report["heldout"]["images"] == 24
    assert report["heldout"]["top1"]["ensemble"] == pytest.approx(report["val"]["top1"]["ensemble"])
    assert report["weights_chosen_on"] is None  # given, not chosen
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["model", "weight", "TenCrop", "centre", "top-1", "(%)", "on"]
    assert [line.split()[0] for line in lines[1:5]] == ["a", "b", "c", "ensemble"]
    assert lines[2].split()[1] == "0.500" and lines[2].endswith("held-out val (24 images)")
    assert f"{report['heldout']['top1']['ensemble']:.2f}" in lines[4]
    assert lines[4].endswith("held-out (24 images, all models)")


def test_a_rerun_cut_short_leaves_no_earlier_zip_or_report_beside_its_csv(three, monkeypatch):
    root, _ = three
    argv = ["--models", "a", "b", "--logits-dir", str(root), "--out-dir", str(root / "subs")]
    blend.main(argv)
    subs = root / "subs"
    shown = {p.name for p in subs.iterdir() if not p.name.startswith(".")}  # not the lock
    assert shown == {"ensemble.csv", "ensemble.zip", "ensemble.json"}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full_disk)  # the rerun's zip fails
    with pytest.raises(OSError, match="No space left"):
        blend.main([*argv, "--weights", "1", "3"])
    shown = {p.name for p in subs.iterdir() if not p.name.startswith(".")}
    assert shown == {"ensemble.csv"}  # no upload of the old zip, no report vouching for it


def test_blend_command_rows_follow_test_index_order(tmp_path):
    rng = np.random.default_rng(7)
    order = rng.permutation(10)
    val, test = random_probs(rng, 24), random_probs(rng, 10)
    make_member(tmp_path, "m", val, test, test_ids=TEST_IDS[order])
    blend_command("--models", "m", "--logits-dir", str(tmp_path), "--out-dir", str(tmp_path / "s"))
    frame = pd.read_csv(tmp_path / "s" / "ensemble.csv")
    assert frame["Image IDs"].tolist() == [f"img_{i}.png" for i in range(10)]


def test_blend_command_reads_models_and_weights_from_an_ensemble_config(tmp_path):
    rng = np.random.default_rng(8)
    names = load_ensemble_config("demo")["models"]
    for name in names:
        make_member(tmp_path, name, random_probs(rng, 24), random_probs(rng, 10))
    blend_command("--config", "demo", "--logits-dir", str(tmp_path), "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["models"] == names and report["weights_from"] == "equal"
    assert report["weights"] == pytest.approx([1 / len(names)] * len(names))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "a", "b", "--weights", "1"], "1 weights for 2 models"),
        (["--models", "a", "b", "--weights", "1", "-1"], "must be finite, >= 0, and not all 0"),
        (["--models", "a", "b", "--weights", "0", "0"], "must be finite, >= 0, and not all 0"),
        (["--models", "a", "b", "--weights", "1e308", "1e308"], "must be 0 or in [1e-30, 1e+30]"),
        (["--models", "a", "b", "--weights", "1e-320", "1"], "scale them (only their ratios"),
        (["--models", "a", "a"], "models listed twice: a"),
        (["--models", "a", "nope"], "run `make logits MODEL=nope` first"),
        (["--config", "no_such_ensemble"], "unknown ensemble 'no_such_ensemble'"),
        (["--models", "a", "logits_dir=x"], "took logits_dir=x as model names: give key=value"),
    ],
)
def test_blend_command_refuses_bad_requests_in_one_line(three, args, message):
    root, _ = three
    proc = blend_command(*args, "--logits-dir", str(root), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_make_ensemble_reads_the_logits_where_make_logits_wrote_them_under_the_same_args(
    three, tmp_path
):
    root, _ = three
    dry = subprocess.run(
        [
            "make",
            "-n",
            "ensemble",
            "MODELS=a b c",
            "DATA=fashion50",
            f"ARGS=--search-weights logits_dir={root}",  # flags and key=value, mixed
            "PY=python",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = dry.stdout.replace("\\\n", " ").splitlines()
    [argv] = [shlex.split(line) for line in lines if "-m ensemble.blend" in line]
    run_command(*argv[1:], "--out-dir", str(tmp_path / "subs"))
    assert (tmp_path / "subs" / "ensemble.csv").is_file()
    report = json.loads((tmp_path / "subs" / "ensemble.json").read_text())
    assert report["search"] is not None  # the flag reached the blend


@pytest.mark.parametrize("search", [("SEARCH=0",), ("SEARCH=no",), ()])
def test_make_ensemble_search_0_or_no_does_not_search(search):
    dry = subprocess.run(
        ["make", "-n", "ensemble", *search, "PY=python"], cwd=ROOT, capture_output=True, text=True
    )
    assert "-m ensemble.blend" in dry.stdout and "--search-weights" not in dry.stdout


def test_another_config_of_the_same_name_does_not_replace_a_submission_unless_named(
    three, tmp_path
):
    root, _ = three
    out, first, second = (
        tmp_path / "subs",
        tmp_path / "one" / "mine.yaml",
        tmp_path / "two" / "mine.yaml",
    )
    for path, models in ((first, ["a", "b"]), (second, ["b", "c"])):
        path.parent.mkdir()
        path.write_text(yaml.safe_dump({"models": models}))
    common = ["--logits-dir", str(root), "--out-dir", str(out)]
    blend_command("--config", str(first), *common)
    made = {p.name: p.read_bytes() for p in out.glob("mine.*")}
    proc = blend_command("--config", str(second), *common, check=False)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {out / 'mine.json'} was made from {first}, not {second}; pass --name (make "
        f"ensemble NAME=...) to keep both, or delete {out / 'mine.json'}\n"
    )
    assert {p.name: p.read_bytes() for p in out.glob("mine.*")} == made  # untouched
    blend_command("--config", str(first), *common)  # the same config: replaced
    blend_command("--config", str(second), *common, "--name", "mine")  # named: replaced
    assert json.loads((out / "mine.json").read_text())["config"] == str(second)


def test_a_second_blend_of_one_name_at_once_is_refused_naming_the_first(three, tmp_path):
    from common.lock import FileLock

    root, _ = three
    out = tmp_path / "subs"
    argv = ["--models", "a", "b", "--logits-dir", str(root), "--out-dir", str(out)]
    with FileLock(out / ".ensemble.lock", "submission ensemble", "wait"):
        proc = blend_command(*argv, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: submission ensemble is in use by ")
    assert "wait, or pass --name" in proc.stderr and not (out / "ensemble.csv").exists()
    blend_command(*argv)
    written = sorted(p.name for p in out.iterdir())  # the lock file removed with the lock
    assert written == ["ensemble.csv", "ensemble.json", "ensemble.zip"]


def test_a_config_s_weights_dropped_by_the_weight_search_are_named(three, tmp_path):
    root, _ = three
    path = tmp_path / "weighted.yaml"
    path.write_text(yaml.safe_dump({"models": ["a", "b"], "weights": [1, 3]}))
    proc = blend_command(
        "--config",
        str(path),
        "--search-weights",
        "--logits-dir",
        str(root),
        "--out-dir",
        str(tmp_path / "subs"),
    )
    assert f"warning: {path}'s weights are not used: --search-weights starts from" in proc.stderr


def with_dataset(root, names, checksum, manifest):
    """Point the members' meta.json at a dataset folder holding `manifest`, and record that
    their logits were made on a dataset of manifest checksum `checksum`."""
    data = root / "dataset"
    data.mkdir(exist_ok=True)
    (data / "manifest.json").write_text(json.dumps(manifest))
    for name in names:
        meta = json.loads((root / name / "meta.json").read_text())
        meta["data_dir"] = str(data)
        meta["provenance"] = {"dataset_checksum": checksum}
        (root / name / "meta.json").write_text(json.dumps(meta))
    return data


def test_a_dataset_rebuilt_since_the_logits_is_refused_and_a_partial_imagenet_one_named(
    three, tmp_path
):
    root, _ = three
    out = tmp_path / "subs"
    argv = ["--models", "a", "b", "--logits-dir", str(root), "--out-dir", str(out)]
    manifest = {"source": "imagenet", "checksum": "f" * 64, "classes": [f"n{i}" for i in range(K)]}
    data = with_dataset(root, "ab", "f" * 64, manifest)
    proc = blend_command(*argv)
    warning = f"{data} is a partial ImageNet build ({K} of 1000 classes): this submission is not"
    assert f"warning: {warning}" in proc.stderr
    report = json.loads((out / "ensemble.json").read_text())
    assert report["data_dir"] == str(data) and any(
        w.startswith(warning) for w in report["provenance"]["warnings"]
    )
    made = {p.name: p.read_bytes() for p in out.iterdir()}
    with_dataset(root, "ab", "e" * 64, manifest)  # the logits' record no longer matches
    proc = blend_command(*argv, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {data} was rebuilt since the members' logits were made")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == made  # refused: nothing touched


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"model": ["a"]}, "needs a `models:` list (unknown keys: model"),
        ({"models": "a"}, "needs a `models:` list (unknown keys: none"),
        ({"models": ["a", 5]}, "models ['a', 5] must each be a model or run name"),
        ({"models": ["a", "b"], "weights": 1}, "weights 1 must be a list of numbers"),
        ({"models": ["a", "b"], "weights": ["a", "b"]}, "weights ['a', 'b'] must be a list"),
        ({"models": ["a", "b"], "weights": {"a": 1}}, "weights {'a': 1} must be a list"),
        ({"models": ["a", "b"], "weights": [1, None]}, "weights [1, None] must be a list"),
    ],
)
def test_an_ensemble_config_of_the_wrong_shape_is_one_line_naming_its_file(
    three, tmp_path, config, problem
):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    root, _ = three
    proc = blend_command("--config", str(path), "--logits-dir", str(root), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {path}: {problem}")


def test_an_ensemble_config_given_as_a_path_names_the_submission_after_its_file(three, tmp_path):
    root, _ = three
    path = tmp_path / "configs" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"models": ["a", "b"], "weights": [1, 3]}))
    out = tmp_path / "subs"
    blend_command("--config", str(path), "--logits-dir", str(root), "--out-dir", str(out))
    report = json.loads((out / "mine.json").read_text())
    assert report["weights"] == [0.25, 0.75] and report["weights_from"] == str(path)
    assert not (path.parent / "mine.csv").exists()
    proc = blend_command("--config", str(path.with_suffix("")), check=False)  # no .yaml
    assert proc.returncode == 2
    assert f"error: ensemble '{path.with_suffix('')}' is neither a name" in proc.stderr


def test_blend_command_records_a_weight_search(tmp_path):
    rng = np.random.default_rng(9)
    onehot = np.eye(K)[VAL_LABELS]
    for name in ("a", "b"):
        noise = rng.dirichlet(np.ones(K), len(VAL_LABELS))
        make_member(
            tmp_path, name, (0.35 * onehot + 0.65 * noise).astype(np.float16), random_probs(rng, 10)
        )
    wrong = np.eye(K)[(VAL_LABELS + 1) % K].astype(np.float16)
    make_member(tmp_path, "wrong", wrong, random_probs(rng, 10))
    blend_command(
        "--models",
        "a",
        "b",
        "wrong",
        "--search-weights",
        "--logits-dir",
        str(tmp_path),
        "--out-dir",
        str(tmp_path),
    )
    report = json.loads((tmp_path / "ensemble.json").read_text())
    assert report["weights_from"] == "search" and report["search"]["accepted"]
    assert report["weights"][2] < min(report["weights"][:2])
    assert report["val"]["top1"]["ensemble"] > report["val"]["top1"]["models"]["wrong"]
    assert report["weights_chosen_on"]["images"] == 24


@pytest.mark.parametrize(
    "damage, found",
    [
        ("negative", "holds -0.25"),
        ("scaled x1000", "sums to 1000"),
        ("logits", "holds -"),
    ],
)
def test_blend_command_refuses_rows_that_are_not_distributions_naming_file_and_row(
    tmp_path, damage, found
):
    rng = np.random.default_rng(9)
    make_member(tmp_path, "good", random_probs(rng, 24), random_probs(rng, 10))
    test = random_probs(rng, 10).astype(np.float32)
    if damage == "negative":
        test[6] = [0.75, 0.5, -0.25, 0.0]  # sums to 1: only the sign gives it away
    elif damage == "scaled x1000":
        test[6:] *= 1000
    else:
        test[6:] = np.log(test[6:] + 1e-3)
    make_member(tmp_path, "bad", random_probs(rng, 24), test.astype(np.float16))
    proc = blend_command("--models", "good", "bad", "--logits-dir", str(tmp_path), check=False)
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2  # (members without provenance also get a warning line)
    assert error.startswith(f"error: {tmp_path / 'bad' / 'test.npz'}: row 6 (id img_6.png) ")
    assert found in error and "not probability distributions" in error


def test_float16_rounding_of_a_softmax_is_within_the_sum_tolerance(tmp_path):
    """The worst case the tolerance must allow: many classes, every value rounded to float16."""
    rng = np.random.default_rng(10)
    for classes in (4, 1000, 16384):
        logits = rng.normal(0, 4, (200, classes))
        exact = np.exp(logits - logits.max(1, keepdims=True))
        exact /= exact.sum(1, keepdims=True)
        stored = exact.astype(np.float16)
        error = np.abs(stored.astype(np.float64).sum(1) - 1).max()
        assert error <= SUM_TOLERANCE, (classes, error)


def test_a_submission_s_config_file_is_the_same_from_any_folder(tmp_path, monkeypatch):
    """What claim_name compares: a config name resolved in configs/, not in the working folder."""
    args = argparse.Namespace(config="demo")
    monkeypatch.chdir(tmp_path)
    assert blend.config_file(args) == str((CONFIG_DIR / "ensembles" / "demo.yaml").resolve())

"""The paper's evidence at small scale: make ablation, make sweep, make long-run and make tsne.

The shared runner's arithmetic (aggregation, differences, verdicts, the time estimate, the
equal-time ratio, the k-NN score) against brute force; run naming; the spec against what the
issue asks for; and each command end to end on a tiny dataset, one epoch, through its real
entry point.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import UserError
from scripts.studies import ablation, long_run, runner, tsne
from tests.conftest import NARROW, run_command
from train.config import load_config


# ---- arithmetic against brute force --------------------------------------------------------
def test_aggregate_is_the_mean_and_sample_std_of_each_row_in_order_of_appearance():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"row": rng.choice(["b", "a", "c"], 40), "test_top1": rng.uniform(0, 100, 40)}
    )
    stats = runner.aggregate(frame)
    assert list(stats.index) == list(dict.fromkeys(frame["row"]))
    for name, stat in stats.iterrows():
        values = [
            float(v) for r, v in zip(frame["row"], frame["test_top1"], strict=True) if r == name
        ]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert stat["mean"] == pytest.approx(mean, rel=1e-12)
        assert stat["std"] == pytest.approx(std, rel=1e-12)
        assert stat["count"] == len(values)
    single = runner.aggregate(pd.DataFrame({"row": ["x"], "test_top1": [5.0]}))
    assert math.isnan(single.loc["x", "std"])
    assert runner.mean_std(single.loc["x"]) == "5.00 ± –"


def test_difference_is_the_gap_of_means_with_its_welch_standard_error():
    a, b = pd.Series([70.0, 72.5, 74.0]), pd.Series([60.0, 61.0, 65.5, 66.0])
    delta, se = runner.difference(a, b)

    def variance(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    assert delta == pytest.approx(sum(a) / 3 - sum(b) / 4, rel=1e-12)
    assert se == pytest.approx(math.sqrt(variance(a) / 3 + variance(b) / 4), rel=1e-12)


def test_the_verdict_calls_two_standard_errors_noise_and_otherwise_compares_signs():
    assert runner.verdict(2.0, 1.0, 0.7) == "within noise"
    assert runner.verdict(2.1, 1.0, 0.7) == "reproduced"
    assert runner.verdict(-2.1, 1.0, 0.7) == "not reproduced"
    assert runner.verdict(2.1, 1.0, None) == "higher"
    assert runner.verdict(-2.1, 1.0, None) == "lower"
    assert runner.verdict(5.0, math.nan, 0.7) == "one seed: no verdict"


def test_the_estimate_trains_each_run_at_the_rate_recorded_for_its_views_and_scores_each_job():
    runs = [
        {"epochs_left": 28, "train_images": 500, "views": 2},
        {"epochs_left": 10, "train_images": 1000, "views": 1},
    ]
    got = runner.estimate_seconds(runs, 5, {2: 0.01, 1: 0.02}, 40.0, 99.0)
    assert got == pytest.approx(28 * 500 * 2 * 0.01 + 10 * 1000 * 0.02 + 5 * 40.0)
    # no rate for two views: the median of the recorded rates; none recorded: the fallback
    got = runner.estimate_seconds(runs[:1], 1, {1: 0.02, 3: 0.04}, 0.0, 99.0)
    assert got == pytest.approx(28 * 500 * 2 * 0.03)
    assert runner.estimate_seconds(runs[:1], 2, {}, 7.0, 0.5) == pytest.approx(
        28 * 500 * 2 * 0.5 + 14.0
    )
    assert runner.duration(59 * 60) == "59 min" and runner.duration(125 * 60) == "2 h 05 min"


def test_the_epoch_time_ratio_pools_every_epoch_of_every_seed():
    baseline = [
        pd.DataFrame({"img_per_s": [90.0, 100.0, 20.0]}),
        pd.DataFrame({"img_per_s": [95.0]}),
    ]
    full = [pd.DataFrame({"img_per_s": [50.0, 40.0]}), pd.DataFrame({"img_per_s": [45.0, 10.0]})]
    pooled_base = sorted([90.0, 100.0, 20.0, 95.0])
    pooled_full = sorted([50.0, 40.0, 45.0, 10.0])
    median = lambda xs: (xs[1] + xs[2]) / 2  # noqa: E731  (four values each)
    expected = median(pooled_base) / median(pooled_full)
    assert long_run.epoch_time_ratio(baseline, full) == pytest.approx(expected, rel=1e-12)


def test_a_row_at_length_shows_the_default_lengths_difference_and_whether_its_sign_moved():
    def scores(a: list[float], b: list[float]) -> pd.DataFrame:
        rows = {"row": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "epochs": [48] * 4}
        return pd.DataFrame({**rows, "test_top1": [*a, *b]})

    row = {"name": "b", "paper_row": "B", "compare_to": "a"}
    long, short = scores([70, 72], [74, 76]), scores([70, 72], [66, 68])
    line = ablation.ablation_line(row, long, {}, short)
    assert "| +4.00 |" in line and line.endswith("| -4.00 | yes |")
    assert ablation.ablation_line(row, long, {}, long).endswith("| +4.00 | no |")
    assert ablation.ablation_line(row, long, {}).endswith("|  |")  # no columns without `short`


def test_knn_accuracy_is_a_leave_one_out_cosine_vote():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 60)
    feats = rng.normal(size=(60, 8)) + 1.5 * np.eye(8)[labels]
    correct = 0
    for i in range(60):
        sims = []
        for j in range(60):
            if j != i:
                cos = feats[i] @ feats[j] / (np.linalg.norm(feats[i]) * np.linalg.norm(feats[j]))
                sims.append((-cos, j))
        nearest = [labels[j] for _, j in sorted(sims)[:5]]
        votes = [nearest.count(c) for c in range(4)]
        correct += votes.index(max(votes)) == labels[i]  # ties: the smallest class
    assert tsne.knn_accuracy(feats, labels) == pytest.approx(100.0 * correct / 60)


# ---- run naming and the spec ----------------------------------------------------------------
def names(rows: list[dict], seed: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    spec = runner.load_spec()
    jobs = runner.row_jobs(spec, rows, [seed], list(extra))
    return [runner.run_name(spec["model"], job, Path("results")) for job in jobs]


def test_rows_that_train_the_same_thing_share_one_run_in_any_stage():
    spec = runner.load_spec()
    rows = {r["name"]: r for r in spec["rows"]}
    base, vanilla, aux, fusion, cr = names(
        [
            rows[n]
            for n in (
                "strong_baseline",
                "vanilla_aug",
                "plus_aux_classifier",
                "plus_aux_fusion",
                "plus_cr",
            )
        ]
    )
    assert base == vanilla and aux == fusion and len({base, aux, cr}) == 3
    (seed1,) = names([rows["strong_baseline"]], seed=1)
    assert seed1 == base[: -len("s0")] + "s1"  # the seed only changes the suffix
    assert names([rows["strong_baseline"]], extra=("epochs=2",)) != [base]
    assert names([rows["strong_baseline"]], extra=("data_dir=elsewhere",)) != [base]
    assert names([rows["plus_aux_classifier"]], extra=("fusion_weight=0.3", "workers=0")) == [aux]
    centre = [r for r in ablation.sweep_rows(spec) if r["recipe_point"]]
    assert set(names(centre)) == {aux}
    epochs = load_config(spec["model"], spec["common"])["epochs"]
    pair = [
        long_run.row(spec, w, "train", "equal_epochs", epochs)
        for w in ("strong_baseline", "plus_aux_fusion")
    ]
    assert names(pair) == [base, aux]


def test_a_row_whose_unquoted_comma_made_a_key_of_its_own_is_refused(tmp_path, monkeypatch):
    spec = tmp_path / "ablation.yaml"
    spec.write_text(
        "rows:\n  - {name: r, table: 1, paper_row: ResNet50 (ResNet-18, 11.2M), paper: 40.9,"
        " eval: student, overrides: []}\n"
    )
    monkeypatch.setattr(runner, "SPEC", spec)
    with pytest.raises(UserError, match=r"row r has unknown keys 11.2M\); quote a value"):
        runner.load_spec()


def test_the_spec_holds_every_row_and_sweep_the_issue_asks_for():
    spec = runner.load_spec()
    rows = {r["name"]: r for r in spec["rows"]}
    assert spec["seeds"] == spec["sweep_seeds"] == spec["long_run"]["seeds"] == [0, 1, 2]
    for row in rows.values():
        assert row.get("from") in (None, *rows) and row.get("compare_to") in (None, *rows)
        assert row["eval"] in runner.EVALS and row["table"] in ablation.TABLES
        assert not any(o.startswith("epochs=") for o in runner.row_overrides(rows, row["name"]))
    for job in runner.row_jobs(spec, spec["rows"], [0], []):
        load_config(spec["model"], list(job.overrides))  # every key exists, every value types
    settings = {o for n in rows for o in runner.row_overrides(rows, n)}
    wanted = {
        "auto_augment=rand-m9-mstd0.5",
        "cr_similarity=cosine",
        "mix_prob=0.5",
        "mt_direction=teacher_student",
        "cr_space=features",
        "cutmix_alpha=0",
        "reprob=0",
    }
    assert wanted <= settings
    paper = {58.77, 59.50, 60.69, 61.46, 61.62, 61.71, 57.25, 55.21, 57.75, 57.22, 54.76}
    paper |= {41.11, 40.91, 45.32, 26.43}  # Table 1 (its EfficientNet-b4 row has no match here)
    assert paper == {r["paper"] for r in rows.values() if r["paper"] is not None}
    sweeps = ablation.sweep_rows(spec)
    assert {r["knob"] for r in sweeps} == {"rce_weight", "cr_weight", "mt_weight", "cr_delta"}
    for (knob, series), group in pd.DataFrame(sweeps).groupby(["knob", "series"]):
        recipe = load_config(spec["model"], spec["common"])[knob]
        assert recipe in group["value"].tolist(), (knob, series)
        assert len(set(group["value"]) - {recipe}) >= 3, (knob, series)
    assert {"probabilities", "features"} == {
        r["series"] for r in sweeps if r["knob"] == "cr_weight"
    }


# ---- end to end on the tiny dataset ---------------------------------------------------------
def tiny_overrides(tiny_dir: Path) -> list[str]:
    return [
        f"data_dir={tiny_dir}",
        "epochs=1",
        "batch_size=8",
        "ckpt_every_steps=0",
        "workers=0",
        NARROW,
    ]


@pytest.fixture(scope="module")
def study_dir(tiny_dir, module_dir):
    """An ablation of three rows (two runs: vanilla_aug is the strong baseline's), one seed."""
    results = module_dir
    args = [
        "-m",
        "scripts.studies.ablation",
        "--rows",
        "strong_baseline",
        "vanilla_aug",
        "plus_aux_fusion",
        "--seeds",
        "0",
        "--results",
        str(results),
        *tiny_overrides(tiny_dir),
    ]
    return results, args, run_command(*args)


@pytest.mark.slow
def test_make_ablation_appends_each_run_writes_its_tables_and_a_rerun_does_nothing(study_dir):
    results, args, first = study_dir
    assert "ablation: 3 runs, 0 done, 3 to do: estimated" in first.stdout
    assert "ablation: 100%" in first.stderr and "3/3" in first.stderr  # the bar over runs
    frame = pd.read_csv(results / "ablation.csv")
    assert frame["row"].tolist() == ["strong_baseline", "plus_aux_fusion", "vanilla_aug"]
    assert frame["test_top1"].between(0, 100).all() and (frame["epochs"] == 1).all()
    assert frame["run"][0] == frame["run"][2] != frame["run"][1]
    assert frame["epochs_trained"].tolist() == [1, 1, 0]  # vanilla_aug reused the run
    assert len(list((results / "runs").iterdir())) == 2
    table = (results / "ablation.md").read_text()
    assert "| vanilla_aug | AutoAugment -> Vanilla Aug |" in table and "55.21" in table
    assert "## Table 3" in table and "## Table 2" in table
    assert (results / "ablation.png").stat().st_size > 1000
    rerun = run_command(*args)
    assert "3 runs, 3 done, 0 to do" in rerun.stdout and "test top-1" not in rerun.stdout
    assert len(pd.read_csv(results / "ablation.csv")) == 3


@pytest.mark.slow
def test_a_run_trained_with_another_default_than_base_yaml_s_now_is_not_reported(
    study_dir, tmp_path
):
    """A changed default keeps a run's name (its digest covers the keys that differ from
    base.yaml): its scores would be reported for a recipe it did not train."""
    results, args, _ = study_dir
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    run = sorted((copy / "runs").iterdir())[0]
    saved = (run / "config.yaml").read_text()
    assert "\nsmoothing: 0.1\n" in saved
    (run / "config.yaml").write_text(saved.replace("\nsmoothing: 0.1\n", "\nsmoothing: 0.2\n"))
    proc = run_command(*[str(copy) if a == str(results) else a for a in args], check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: 1 runs in {copy / 'runs'} trained with other values")
    assert f"({run.name}: smoothing)" in proc.stderr


@pytest.mark.slow
def test_rows_at_another_length_have_their_own_tables_beside_the_ablation(tmp_path, tiny_dir):
    """`--epochs 2`: the rows trained 2 epochs, apart in ablation_e2.*; no ablation.* written."""
    results = tmp_path
    args = ["-m", "scripts.studies.ablation", "--epochs", "2", "--rows", "vanilla_aug"]
    args += ["--seeds", "0", "--results", str(results), *tiny_overrides(tiny_dir)]
    assert "ablation_e2: 1 runs, 0 done" in run_command(*args).stdout
    frame = pd.read_csv(results / "ablation_e2.csv")
    assert frame["row"].tolist() == ["vanilla_aug"] and frame["epochs"].tolist() == [2]
    table = (results / "ablation_e2.md").read_text()
    assert "every run 2 epochs long" in table and "| Δ at 12 ep | sign moved |" in table
    assert (results / "ablation_e2.png").is_file()
    assert not (results / "ablation.md").exists() and not (results / "ablation.csv").exists()


@pytest.mark.slow
def test_make_sweep_scores_each_value_and_draws_figure_4(study_dir, tiny_dir):
    """At a length of its own (`--epochs 1`, the tiny runs' length: the ablation's run is the
    recipe's point), apart in sweep_e1.*, val beside test."""
    results, _, _ = study_dir
    run_command(
        "-m",
        "scripts.studies.ablation",
        "--sweep",
        "--epochs",
        "1",
        "--rows",
        "rce_weight=0.01",
        "rce_weight=0.1",
        "mt_weight=1.0",
        "--seeds",
        "0",
        "--results",
        str(results),
        *tiny_overrides(tiny_dir),
    )
    sweep = pd.read_csv(results / "sweep_e1.csv")
    full = pd.read_csv(results / "ablation.csv").set_index("row").loc["plus_aux_fusion", "run"]
    runs = dict(zip(sweep["row"], sweep["run"], strict=True))
    assert runs["rce_weight=0.01"] == runs["mt_weight=1.0"] == full  # the recipe's own point
    assert runs["rce_weight=0.1"] != full
    assert len(list((results / "runs").iterdir())) == 3  # one new run
    alpha = (results / "sweep_e1_rce_weight.md").read_text()
    assert "| val top-1 (%) | test top-1 (%) |" in alpha and "| Δ val |" in alpha
    recipe = next(line for line in alpha.splitlines() if line.startswith("| 0.01 (recipe) |"))
    val = sweep.set_index("row").loc["rce_weight=0.01", "val_top1"]
    assert f"| {val:.2f} ± – |" in recipe
    assert "| 0.1 |" in alpha
    assert (results / "sweep_e1_mt_weight.md").is_file()
    assert (results / "sweep_e1.png").stat().st_size > 1000
    assert not (results / "sweep.csv").exists()


@pytest.mark.slow
def test_make_tsne_embeds_both_runs_and_prints_their_separation(study_dir, tiny_dir):
    results, _, _ = study_dir
    out = run_command(
        "-m",
        "scripts.studies.tsne",
        "strong_baseline",
        "plus_aux_fusion",
        "--images",
        "20",
        "--results",
        str(results),
        *tiny_overrides(tiny_dir),
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("| ") and "(seed 0)" in line]
    assert [line.split(" (seed")[0] for line in lines] == ["| strong_baseline", "| plus_aux_fusion"]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "20" and -1 <= float(cells[2]) <= 1 and 0 <= float(cells[4]) <= 100
    assert (results / "tsne.png").stat().st_size > 1000
    assert (results / "tsne.md").read_text().count("(seed 0)") == 2


@pytest.mark.slow
def test_make_long_run_measures_equal_time_and_trains_the_long_runs(study_dir, tiny_dir):
    results, _, _ = study_dir
    args = [
        "-m",
        "scripts.studies.long_run",
        "--splits",
        "train",
        "--factor",
        "2",
        "--seeds",
        "0",
        "--results",
        str(results),
        *tiny_overrides(tiny_dir),
    ]
    out = run_command(*args).stdout
    assert "long-run: estimated" in out
    frame = pd.read_csv(results / "long_run.csv").set_index("row")
    assert sorted(frame.index) == sorted(
        f"{w}:train:{r}"
        for w, r in [
            ("strong_baseline", "equal_epochs"),
            ("plus_aux_fusion", "equal_epochs"),
            ("strong_baseline", "equal_time"),
            ("strong_baseline", "long"),
            ("plus_aux_fusion", "long"),
        ]
    )
    ablated = pd.read_csv(results / "ablation.csv").set_index("row")["run"]
    assert frame.loc["strong_baseline:train:equal_epochs", "run"] == ablated["strong_baseline"]
    assert frame.loc["plus_aux_fusion:train:long", "epochs"] == 2
    budget = json.loads((results / "long_run_budget.json").read_text())["1"]
    assert frame.loc["strong_baseline:train:equal_time", "epochs"] == budget["equal_time_epochs"]
    assert budget["ratio"] > 0 and len(budget["measured_on"]) == 2
    report = (results / "long_run.md").read_text()
    assert "| train | equal time |" in report and "| train | long run | 2 / 2 |" in report
    assert (results / "long_run.png").stat().st_size > 1000
    assert "0 to do" in run_command(*args).stdout  # a rerun trains nothing


@pytest.mark.slow
def test_make_frontier_trains_both_sides_at_equal_time_and_draws_the_frontier(study_dir, tiny_dir):
    """On the ablation's results: the full recipe's 1-epoch train run is the ablation's own."""
    results, _, _ = study_dir
    args = ["-m", "scripts.studies.frontier", "--epochs", "1", "--trainval-epochs", "1"]
    args += ["--seeds", "0", "--results", str(results), *tiny_overrides(tiny_dir)]
    out = run_command(*args).stdout
    assert "measuring the epoch-time ratio" in out and "frontier: 4 runs, 0 done" in out
    ratio = json.loads((results / "frontier_budget.json").read_text())["ratio"]
    frame = pd.read_csv(results / "frontier.csv").set_index("row")
    ablated = pd.read_csv(results / "ablation.csv").set_index("row")["run"]
    assert frame.loc["plus_aux_fusion:train:E1", "run"] == ablated["plus_aux_fusion"]
    for split in ("train", "train+val"):
        assert frame.loc[f"plus_aux_fusion:{split}:E1", "epochs"] == 1
        equal_time = max(1, round(ratio))
        assert frame.loc[f"strong_baseline:{split}:E1", "epochs"] == equal_time
    report = (results / "frontier.md").read_text()
    assert "| train | 1 |" in report and "| train+val | 1 |" in report
    assert (results / "frontier.png").stat().st_size > 1000
    assert "0 to do" in run_command(*args).stdout  # a rerun trains nothing
    # a run of one budget keeps every budget already scored in the report
    args[args.index("--trainval-epochs") + 1] = "0"
    assert "frontier: 2 runs, 2 done, 0 to do" in run_command(*args).stdout
    assert "| train+val | 1 |" in (results / "frontier.md").read_text()


@pytest.mark.parametrize(
    ("images", "problem"),
    [
        ("5", "argument --images: '5' must be a whole number of at least 20"),
        ("-5", "argument --images: '-5' must be"),
    ],
)
def test_make_tsne_refuses_too_few_images_in_one_line(images, problem, capsys):
    with pytest.raises(SystemExit) as stopped:
        tsne.main(["strong_baseline", "--images", images])
    assert stopped.value.code == 2 and problem in capsys.readouterr().err


def test_a_tsne_sample_with_as_many_classes_as_images_is_refused(tmp_path):
    """20 test images of 20 classes: the silhouette needs fewer classes than images."""
    for c in range(20):
        (tmp_path / "src" / f"class_{c}").mkdir(parents=True)
        for i in range(3):
            pixels = np.full((4, 4, 3), c * 10 + i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "src" / f"class_{c}" / f"{i}.png")
    out = tmp_path / "data"
    run_command(
        "-m",
        "data_prep",
        "folder",
        "--root",
        str(tmp_path / "src"),
        "--per-class",
        "1,1,1",
        "--out",
        str(out),
    )
    with pytest.raises(UserError, match=f"20 test images of 20 classes sampled from {out}"):
        tsne.test_sample(out, 20)


def test_a_time_ratio_measured_on_another_cpu_or_with_other_overrides_is_named(tmp_path, capsys):
    from scripts.studies import frontier

    kept = {"ratio": 1.5, "measured": "2026-12-05", "cpu": frontier.cpu_name()}
    (tmp_path / "frontier_budget.json").write_text(json.dumps(kept))
    assert frontier.budget({}, [], tmp_path) == kept  # this machine's: kept without a word
    assert capsys.readouterr().err == ""
    (tmp_path / "frontier_budget.json").write_text(json.dumps({**kept, "cpu": "Other CPU"}))
    assert frontier.budget({}, ["lr=0.1"], tmp_path)["ratio"] == 1.5
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {tmp_path / 'frontier_budget.json'}: the time ratio 1.5 was")
    assert "not on " in err and "delete the file to measure here" in err


def test_make_long_run_without_the_train_split_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        long_run.main(["--splits", "train+val"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --splits train+val: add train; the equal-time epochs")


def test_rows_appended_by_two_study_processes_are_all_kept(tmp_path):
    """Each append reads the CSV again: a row another process added meanwhile stays."""
    csv = tmp_path / "ablation.csv"
    mine = runner.read_results(csv)  # what this process read when it started: nothing
    runner.append_row(csv, {"row": "a", "seed": 0, "run": "r0", "test_top1": 50.0})
    theirs = runner.append_row(csv, {"row": "b", "seed": 0, "run": "r1", "test_top1": 60.0})
    assert mine.empty and theirs["row"].tolist() == ["a", "b"]
    assert pd.read_csv(csv)["row"].tolist() == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.csv"]  # no lock file left


def test_a_run_trained_with_a_key_base_yaml_no_longer_has_is_named_not_a_crash(tmp_path):
    cfg = {**load_config("demo_resnet18"), "out_dir": str(tmp_path), "name": "run"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("smoothing: 0.1\nretired_key: 3\n")
    assert runner.trained_otherwise(cfg) == ["retired_key"]

"""`make gpu-check`: the refusal without CUDA, and each section's measurement run on the CPU at
toy sizes (the figures are the GPU's to give; here the parts must run and count right). The
measurements that only mean something on a GPU (host syncs, the B7 step's peak memory, compile)
run in tests/test_gpu.py, skipped without CUDA."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.processes import command_line, process_tree, running
from scripts.bench import gpu_check
from scripts.ops import plan
from scripts.stages import ROOT, child_env, run_child
from tests.conftest import run_command
from train.config import load_config

TOY = ["arch=resnet18", "img_size=32", "test_size=32", "batch_size=4", "mixed_precision=no"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check instead")
def test_without_cuda_it_refuses_in_one_line():
    proc = run_command("-m", "scripts.bench.gpu_check", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: make gpu-check needs a CUDA GPU and this machine has none visible "
        "(torch.cuda.is_available() is False); run it on a GPU machine"
    ]


def toy(tiny_dir, tmp_path) -> list[str]:
    return [*TOY, *gpu_check.data_overrides(tiny_dir, tmp_path, 10)]


def test_the_bare_step_rates_compare_the_baseline_and_the_attract_repulse_step(tiny_dir, tmp_path):
    overrides = toy(tiny_dir, tmp_path)
    rates = gpu_check.step_rates(gpu_check.B2, overrides, 2, tmp_path)
    # Both real steps ran and were timed (which is faster is the GPU's to say).
    assert rates["attract_repulse"] > 0 and rates["baseline"] > 0
    gflops, _ = plan.forward_gflops(load_config(gpu_check.B2, overrides))
    assert rates["tflops"] == pytest.approx(rates["attract_repulse"] * 2 * 4 * gflops / 1e3)


def test_the_generated_dataset_splits_each_class_into_train_val_and_test(tmp_path):
    data = gpu_check.make_dataset(tmp_path, classes=3, per_class=2)
    counts = json.loads((data / "manifest.json").read_text())["counts"]
    names = [f"class_{label:02d}" for label in range(3)]
    per_class = {split: dict.fromkeys(names, n) for split, n in (("train", 2), ("val", 4))}
    assert counts == {**per_class, "test": 3}  # the test split is unlabelled: a total
    with Image.open(next((data / "train" / "class_02").iterdir())) as image:
        assert min(image.size) >= 320  # ImageNet-size, as the real loop decodes


def test_the_loader_rate_times_a_second_pass_of_the_images_repeated_to_its_batches(
    tiny_dir, tmp_path, monkeypatch
):
    sizes, passes = [], []
    real = gpu_check.train_loader

    class Passes(list):
        def __iter__(self):
            passes.append(len(self))
            return super().__iter__()

    def counted(cfg, items, rank, world):
        loader, dataset, sampler = real(cfg, items, rank, world)
        sizes.append(len(items))
        return Passes(loader), dataset, sampler

    monkeypatch.setattr(gpu_check, "train_loader", counted)
    monkeypatch.setattr(time, "perf_counter", iter([10.0, 12.0]).__next__)
    overrides = [*gpu_check.data_overrides(tiny_dir, tmp_path, 10), *TOY, "workers=0"]
    # 200 batches of 4 from the tiny dataset's 80 training images: 800 images in 2 s.
    assert gpu_check.loader_rate(gpu_check.B2, overrides, batches=200) == 400.0
    assert sizes == [800] and passes == [200, 200]  # the first pass starts the workers


@pytest.mark.parametrize("smi", ["echo 42", "exit 9", None])
def test_the_utilisation_sampler_reads_nvidia_smi_and_survives_its_absence(
    smi, tmp_path, monkeypatch
):
    """Samples while active; a failing nvidia-smi gives none, a missing one ends the thread
    quietly (the loop's row then names no utilisation)."""
    calls = tmp_path / "calls"
    if smi is not None:
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\necho >> {calls}\n{smi}\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    errors: list[BaseException] = []
    monkeypatch.setattr("threading.excepthook", lambda args: errors.append(args.exc_value))
    with gpu_check.Utilisation(tmp_path / "metrics.csv", every=0.02) as sampled:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # two calls answered, or the thread ended
            answered = calls.is_file() and len(calls.read_text().splitlines()) >= 3
            if answered or not sampled._thread.is_alive():
                break
            time.sleep(0.02)
    assert errors == []
    assert {percent for percent, _ in sampled.samples} == ({42} if smi == "echo 42" else set())
    assert smi != "echo 42" or len(sampled.samples) >= 2
    assert smi is not None or not calls.exists()


def test_the_sampler_asks_for_torch_s_gpu_by_uuid_and_falls_back_to_index_0(tmp_path, monkeypatch):
    """nvidia-smi ignores CUDA_VISIBLE_DEVICES: its index 0 may not be the GPU torch uses."""
    asked = tmp_path / "asked"
    script = f'#!/bin/sh\necho "$4" >> {asked}\ncase "$4" in GPU-bad) exit 6;; *) echo 7;; esac\n'
    (tmp_path / "nvidia-smi").write_text(script)
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for names, first in ((["GPU-good"], "GPU-good"), (["GPU-bad"], "0"), ([], "0")):
        asked.unlink(missing_ok=True)
        monkeypatch.setattr(gpu_check, "smi_names", lambda names=names: list(names))
        with gpu_check.Utilisation(tmp_path / "metrics.csv", every=0.02) as sampled:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(sampled.samples) < 2:
                time.sleep(0.02)
        assert {percent for percent, _ in sampled.samples} == {7}
        assert asked.read_text().split()[-1] == first


def test_the_utilisation_kept_is_that_of_the_epochs_after_the_first(tmp_path):
    """Start-up and cuDNN's search (before epoch 1 ends) and the end (after the last) are out."""
    metrics = tmp_path / "metrics.csv"
    sampled = gpu_check.Utilisation(metrics)
    assert sampled.epochs() == 0
    metrics.write_text("epoch,img_per_s\n1,90\n2,100\n3,100\n")
    sampled.samples = [(0, 0), (5, 0), (80, 1), (90, 2), (70, 2), (3, 3)]
    assert sampled.epochs() == 3 and sampled.steady() == [80, 90, 70]


def test_agreement_is_the_largest_difference_and_the_share_of_equal_argmax():
    cpu = np.array([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5 - 1e-9]])
    gpu = np.array([[0.6, 0.4], [0.3, 0.7], [0.5 - 2e-9, 0.5]])
    worst, same = gpu_check.agreement(cpu, gpu)
    assert worst == pytest.approx(0.1) and same == pytest.approx(200 / 3)


def test_the_demo_rows_set_each_stage_beside_the_cpu_figure():
    assert gpu_check.demo_row("train demo_resnet18_w16", 33.2, 99) == (
        "make demo on the GPU: train demo_resnet18_w16",
        "33 s",
        "2-core CPU 99 s: 3.0x faster",
    )
    assert gpu_check.demo_row("total (data kept)", 55, 220)[2] == "2-core CPU 220 s: 4.0x faster"
    assert gpu_check.demo_row("evaluate", 0.4, None) == (
        "make demo on the GPU: evaluate",
        "0 s",
        "",
    )


def test_the_report_keeps_every_finished_section(tmp_path):
    report = gpu_check.Report(tmp_path / "gpu_check.md", "# header", key="a GPU, this code")
    report.add("bare", [("a", "1 img/s", "")], 1.0)
    report.add("loader", [("b", "2 img/s", "x")], 2.0)
    text = (tmp_path / "gpu_check.md").read_text()
    assert re.match(r"# header\n\n## bare \(1 s, \d\d:\d\d\)", text)
    assert "| b | 2 img/s | x |" in text


def test_a_rerun_finishes_the_earlier_report_of_the_same_gpu_and_code(tmp_path, monkeypatch):
    path = tmp_path / "gpu_check.md"
    first = gpu_check.Report(path, "# run 1", key="H100, commit a")
    first.rates.update(baseline=500.0, attract_repulse=280.0)  # as the bare section fills them
    first.add("bare", [("bare step", "500 img/s", "")], 40)
    first.add("loop", [("real loop", "90 / 100", ""), ("loop", "cut short", "")], 300)
    first.add("demo", [("demo", "not run", "")], 0)

    rerun = gpu_check.Report(path, "# run 2", key="H100, commit a")
    assert rerun.rates == {"baseline": 500.0, "attract_repulse": 280.0}
    assert gpu_check.chosen_sections(["demo", "loop"], rerun.rates) == ["demo", "loop"]
    rerun.add("demo", [("demo", "60 s", "")], 60)
    rerun.add("loop", [("real loop", "250 / 260", "")], 90)
    text = path.read_text()
    assert text.startswith("# run 2\n\n## bare (40 s")  # kept, in the sections' order
    assert text.index("bare step") < text.index("250 / 260") < text.index("| demo | 60 s |")
    assert "cut short" not in text and "not run" not in text

    # Another GPU or other code: nothing of the earlier run is kept, and the bare steps come
    # first wherever a section compares with them.
    other = gpu_check.Report(path, "# run 3", key="H200, commit a")
    assert other.rates == {} and path.read_text() == "# run 3\n"
    assert gpu_check.chosen_sections(["demo", "loop"], other.rates) == ["bare", "demo", "loop"]
    assert gpu_check.chosen_sections(["b7", "demo"], other.rates) == ["b7", "demo"]

    monkeypatch.setattr(gpu_check.sys, "executable", "/usr/bin/python3")  # the machine's own
    assert gpu_check.rerun_command(["loop", "demo"], path) == (
        f'make gpu-check PY=/usr/bin/python3 ARGS="--sections loop demo --report {path}"'
    )
    monkeypatch.setattr(gpu_check.sys, "executable", str(ROOT / ".venv" / "bin" / "python"))
    assert gpu_check.rerun_command(["demo"], gpu_check.REPORT) == (
        'make gpu-check ARGS="--sections demo"'
    )


def test_a_section_cut_short_or_failed_keeps_what_it_measured_and_is_named_for_the_rerun(
    tmp_path,
):
    def cut():  # the real loop's second run past the budget
        yield ("real loop, attract_repulse", "100 / 200", "")
        raise subprocess.TimeoutExpired("train.launch", 60)

    def failed():
        yield ("B7 448 px", "30 GiB", "")
        raise RuntimeError("out of memory\n  at step 2")

    sections = {"b7": failed, "loop": cut, "demo": lambda: [("demo", "9 s", "")]}
    report = gpu_check.Report(tmp_path / "gpu_check.md", "# header", key="a GPU")
    again = gpu_check.run_sections(sections, report, gpu_check.UNBOUNDED)
    assert again == ["b7", "loop"]
    text = (tmp_path / "gpu_check.md").read_text()
    failed_row = "| b7 | failed | RuntimeError: out of memory at step 2 |"
    assert f"| B7 448 px | 30 GiB |  |\n{failed_row}" in text
    assert "| real loop, attract_repulse | 100 / 200 |  |\n| loop | cut short |" in text
    assert "| demo | 9 s |  |" in text

    spent = gpu_check.Budget(0)
    assert gpu_check.run_sections({"demo": failed}, report, spent) == ["demo"]
    assert (
        "| demo | not run | the time budget (--minutes) was spent |"
        in report.state["sections"]["demo"]
    )


def test_the_command_wires_each_section_to_its_function_and_names_what_to_rerun(
    monkeypatch, tmp_path, capsys
):
    """main() with each section's function replaced by one that checks its call against the
    real signature: a device session must not be spent on a wiring mistake."""
    called = []

    def stand_in(name, rows):
        real = getattr(gpu_check, name)

        def fake(*args, **kwargs):
            bound = inspect.signature(real).bind(*args, **kwargs)
            called.append(name)
            if name == "loop_section":
                assert isinstance(bound.arguments["budget"], gpu_check.Budget)
                yield ("real loop, attract_repulse", "90 / 100", "")
                raise subprocess.TimeoutExpired("train.launch", 1)
            yield from rows

        monkeypatch.setattr(gpu_check, name, fake)

    for name in ("bare_section", "loader_section", "b7_section", "demo_section"):
        stand_in(name, [(name, "1", "")])
    stand_in("loop_section", [])
    stand_in("compile_section", [("compile_section", "2", "")])
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: None)
    built = []
    monkeypatch.setattr(gpu_check, "make_dataset", lambda folder, *_: built.append(1) or folder)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "a GPU")
    report = tmp_path / "gpu_check.md"
    code = {"git_commit": "abc", "git_dirty": False}  # a clean tree
    monkeypatch.setattr(gpu_check.provenance, "code_state", lambda: code)
    gpu_check.main(["--report", str(report), "--minutes", "5"])
    assert called == [f"{name}_section" for name in gpu_check.SECTIONS]
    text = report.read_text()
    assert "--minutes 5`" in text and "| loop | cut short |" in text
    assert "| compile_section | 2 |" in text  # the sections after a cut one still ran
    last = capsys.readouterr().out.splitlines()[-1]
    rerun = gpu_check.rerun_command(["loop"], report)
    assert last == f"gpu-check: to finish, run: {rerun}" and "--sections loop" in rerun
    assert built == [1]  # once, for the first section that trains on it
    # The rerun finds the first run's report although those files made the tree dirty.
    code["git_dirty"] = True
    gpu_check.main(["--report", str(report), "--sections", "b7", "demo"])
    assert built == [1] and called[-2:] == ["b7_section", "demo_section"]
    assert "| compile_section | 2 |" in report.read_text()  # kept from the first run
    # The stand-in bare section measured no rates: a rerun of the loop measures them first.
    gpu_check.main(["--report", str(report), "--sections", "loop"])
    assert called[-2:] == ["bare_section", "loop_section"]


def test_a_stage_finds_the_repository_first_and_the_packages_already_on_pythonpath(
    monkeypatch, tmp_path
):
    """The device machine's missing packages are installed with --target onto PYTHONPATH: the
    stages' children and make's targets keep them, after the repository."""
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}/opt/more")
    assert child_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(tmp_path), "/opt/more"]
    echo = ["make", "-s", "--eval", 'pythonpath: ; @echo "$$PYTHONPATH"', "pythonpath"]
    made = subprocess.run(echo, cwd=ROOT, capture_output=True, text=True, check=True)
    assert made.stdout.split() == [f"{ROOT}:{tmp_path}:/opt/more"]
    monkeypatch.delenv("PYTHONPATH")
    assert child_env()["PYTHONPATH"] == str(ROOT)
    made = subprocess.run(echo, cwd=ROOT, capture_output=True, text=True, check=True)
    assert made.stdout.split() == [str(ROOT)]


def test_a_child_past_its_time_is_ended_with_the_processes_it_started(tmp_path):
    """As `train.launch` past the budget: its training processes must not hold the GPU on."""
    pid_file = tmp_path / "grandchild"
    code = (
        "import subprocess, sys, time, pathlib\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(kid.pid)); time.sleep(60)"
    )
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_child([sys.executable, "-c", code], timeout=5)
    grandchild = int(pid_file.read_text())
    while running(grandchild) and time.monotonic() - started < 30:  # re-parented, then reaped
        time.sleep(0.1)
    assert not running(grandchild)


def test_the_compile_rows_give_each_mode_its_rate_and_a_failed_mode_its_last_line(
    monkeypatch, tiny_dir, tmp_path
):
    """The compiled steps themselves run in tests/test_compile.py (CPU) and on a GPU here."""

    def timing(model, overrides, repeat, timeout):  # the child process's result, or its failure
        if "compile=reduce-overhead" in overrides:
            raise SystemExit("bench_train: the step failed:\nTraceback\nRuntimeError: no graph")
        seconds = 0.5 if "num_views=1" in overrides else 1.0
        return {"first": 40.0, "c": seconds, "graph_breaks": 0, "cudagraph_skips": 0}

    monkeypatch.setattr(gpu_check, "own_process_seconds", timing)
    eager = {"baseline": 64.0, "attract_repulse": 16.0}
    rows = list(gpu_check.compile_section(tiny_dir, tmp_path, 3, eager))
    assert rows == [
        (
            "B2 attract_repulse bare step, compile=true",
            "64 img/s",
            "4.00x eager; compile 40 s once; 0 graph breaks",
        ),
        (
            "B2 baseline bare step, compile=true",
            "128 img/s",
            "2.00x eager; compile 40 s once; 0 graph breaks",
        ),
        (
            "B2 attract_repulse bare step, compile=reduce-overhead",
            "failed",
            "RuntimeError: no graph",
        ),
    ]


def test_the_b7_section_reads_a_step_s_peak_against_make_plan_s_line(monkeypatch):
    """The section's own code at a toy size on the CPU: CUDA's device and peak-memory calls
    stood in (the peak's value is the GPU's to give), plan's state and step on the CPU."""
    toy = load_config("demo_resnet18_w16")
    monkeypatch.setattr(gpu_check, "load_config", lambda name: toy)
    build, step = plan.build_state, plan.training_step
    monkeypatch.setattr(plan, "build_state", lambda cfg, device="cpu": build(cfg, "cpu"))
    monkeypatch.setattr(
        plan, "training_step", lambda s, n, size, device="cpu": step(s, n, size, "cpu")
    )
    memory = {"total_memory": 80 * gpu_check.GIB}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(**memory))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: gpu_check.GIB)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the section's
    footprint = plan.footprint(toy)
    estimate = footprint.bytes_at(toy["batch_size"]) / gpu_check.GIB
    label = f"B7 448 px, {toy['batch_size']} images"
    (peak, rate) = gpu_check.b7_section(repeat=1)
    assert peak == (
        f"{label}: peak allocated",
        "1.0 GiB",
        f"make plan: {estimate:.1f} GiB ({estimate - 1:+.0%})",
    )
    assert rate[0] == f"{label}: make plan's step (both views, NCHW)" and rate[1].endswith("img/s")
    assert float(rate[1].split()[0]) > 0
    memory["total_memory"] = footprint.fixed_bytes  # no room for one image
    assert gpu_check.b7_section(repeat=1) == [
        ("B7 448 px step", "not run", "make plan fits no image on this GPU")
    ]


def test_a_step_in_its_own_process_reports_its_times_and_compile_counters(tiny_dir, tmp_path):
    overrides = [*gpu_check.data_overrides(tiny_dir, tmp_path, 10), *TOY]
    timing = gpu_check.own_process_seconds(gpu_check.B2, overrides, 2, timeout=300)
    assert timing["first"] > 0 and timing["c"] > 0
    assert timing["graph_breaks"] == 0 == timing["cudagraph_skips"]  # eager: nothing compiled


@pytest.mark.slow
def test_the_real_loop_reports_its_images_per_second_for_each_epoch(tiny_dir, tmp_path):
    overrides = [*toy(tiny_dir, tmp_path), "batch_size=16"]  # 5 steps an epoch: as many rates
    per_epoch, samples, cut = gpu_check.loop_rates(gpu_check.B2, overrides, 2)
    assert len(per_epoch) == 2 and min(per_epoch) > 0 and cut is None
    assert samples == []  # no GPU to sample here


@pytest.mark.slow
def test_the_real_loop_past_the_budget_keeps_its_epochs_and_leaves_no_training_process(
    tiny_dir, tmp_path
):
    """train.launch starts accelerate in a session of its own: the budget ends the whole tree."""
    # 5 steps an epoch, not 20: an epoch must end inside the budget on a loaded 2-core machine
    # (at 20 steps, beside another worker's runs, the first epoch took about 45 s).
    overrides = [*toy(tiny_dir, tmp_path), "batch_size=16"]
    begun = time.monotonic()
    per_epoch, _, cut = gpu_check.loop_rates(gpu_check.B2, overrides, 500, gpu_check.Budget(0.75))
    assert time.monotonic() - begun < 60 and isinstance(cut, subprocess.TimeoutExpired)
    assert per_epoch and min(per_epoch) > 0, "killed before an epoch: the test shows nothing"
    time.sleep(1)
    assert [pid for pid in process_tree(1) if str(tmp_path) in " ".join(command_line(pid))] == []


def test_a_real_loop_cut_short_reports_its_finished_epochs_then_the_cut(monkeypatch, tmp_path):
    timeout = subprocess.TimeoutExpired("train.launch", 1.0)
    runs = iter([([90.0, 100.0], [40, 60], None), ([300.0], [], timeout)])
    monkeypatch.setattr(gpu_check, "loop_rates", lambda *args: next(runs))
    rates = {"attract_repulse": 100.0, "baseline": 400.0}
    section = gpu_check.loop_section(tmp_path, tmp_path, rates, 3, gpu_check.UNBOUNDED)
    rows, finished = gpu_check.measure("loop", lambda: section, gpu_check.UNBOUNDED)
    assert not finished and rows == [
        (
            "real loop, attract_repulse, img/s per epoch",
            "90 / 100",
            "last epoch 1.00x the bare step, GPU busy after epoch 1 (evaluations and checkpoints "
            "included): median 50%, mean 50%",
        ),
        ("real loop, baseline, img/s per epoch", "300", "last epoch 0.75x the bare step"),
        ("loop", "cut short", "the time budget (--minutes) ran out"),
    ]


@pytest.mark.parametrize(
    ("stop", "row"),
    [(subprocess.TimeoutExpired("scripts.ops.demo", 1.0), "cut short"), (UserError("x"), "failed")],
)
def test_a_demo_cut_short_or_failed_reports_the_stages_it_finished_then_why(
    monkeypatch, tmp_path, stop, row
):
    def demo_until_the_budget(*args, **kwargs):
        timings = Path(args[args.index("--timings") + 1])
        timings.write_text(json.dumps({"data": 0.0, "train demo_resnet18_w16": 33.0}))
        raise stop

    monkeypatch.setattr(gpu_check, "run_module", demo_until_the_budget)
    section = gpu_check.demo_section(tmp_path, gpu_check.UNBOUNDED)
    rows, finished = gpu_check.measure("demo", lambda: section, gpu_check.UNBOUNDED)
    assert not finished and [row[:2] for row in rows] == [
        ("make demo on the GPU: data", "0 s"),
        ("make demo on the GPU: train demo_resnet18_w16", "33 s"),
        ("demo", row),
    ]
    assert rows[1][2] == "2-core CPU 99 s: 3.0x faster"


@pytest.mark.slow
def test_the_agreement_rows_predict_one_checkpoint_twice_and_compare(tiny_dir, tmp_path):
    """On the CPU both 'devices' are the CPU: the fp32 probabilities agree exactly."""
    dirs = [f"data_dir={tiny_dir}", f"out_dir={tmp_path / 'runs'}", f"logits_dir={tmp_path}"]
    member = "demo_resnet18_w16"
    run_command("-m", "train", member, *dirs, "epochs=1", "batch_size=8")
    rows = list(gpu_check.agreement_rows(member, dirs, tmp_path))
    assert [r[0] for r in rows] == [
        f"{member} TenCrop, GPU no vs CPU fp32",
        f"{member} TenCrop, GPU bf16 vs CPU fp32",
    ]
    assert rows[0][1] == "max |dp| 0.00e+00, argmax equal 100.00%"


@pytest.mark.parametrize(
    ("target", "module"), [("gpu-check", "scripts.bench.gpu_check"), ("test-gpu", "pytest")]
)
def test_make_on_a_gpu_machine_with_its_own_python_runs_it_without_setup(target, module):
    """The device machine has its own torch and no network: `make <target> PY=python3` must not
    build .venv (setup would fail to download the pinned wheels); without PY= it does."""

    def dry_run(*variables: str) -> str:
        argv = ["make", "-n", target, *variables]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout

    own = dry_run("PY=python3")
    assert "setup.sh" not in own and f"python3 -m {module}" in own
    assert "bash scripts/ops/setup.sh" in dry_run()


def test_make_test_gpu_without_a_cuda_device_fails_in_one_line_instead_of_skipping_to_green():
    proc = subprocess.run(
        ["make", "test-gpu", f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "pytest" not in proc.stdout  # refused before it ran
    assert "make test-gpu: torch sees no CUDA device" in proc.stderr

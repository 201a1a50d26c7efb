"""`make gpu-check`: one command that measures the GPU path, section by section.

Without CUDA it refuses in one line. On a CUDA machine each section prints its table as soon as
it is measured and rewrites results/gpu_check.md (the sections so far), so that a run cut short
still reports what it measured; a section that fails is reported as failed, with its error, and
the next one runs. In order:

1. bare: the real step (`train.run.Run.train_step`: the device's augmentation of a real loader
   batch, then Algorithm 1) of EfficientNet-B2 at 320 px (configs/models/effnet_b2_ablation.yaml,
   64 images, bf16), strong baseline and Attract-and-Repulse, images/s and model TFLOP/s;
   and the host syncs per optimiser step (`torch.cuda.set_sync_debug_mode("warn")`).
2. loader: the training loader at `workers: auto` on generated ImageNet-size JPEGs (16 classes,
   ~2,000 images; a second pass of 128 batches, its workers started), images/s, against what the
   A&R step consumes.
3. loop: `python -m train.launch` (as `make train`) on those JPEGs, 3 epochs, for both steps:
   images/s per epoch, the ratio to the bare step, and the GPU's utilisation sampled every half
   second in the epochs after the first.
4. b7: EfficientNet-B7 at 448 px (effnet_b7): peak memory of a step against `make plan`'s
   estimate, and its images/s.
5. demo: `make demo`'s pipeline on the GPU (both members, TenCrop logits, ensemble, evaluation)
   with its timing table, then one member's checkpoint predicted on the CPU and on the GPU: the
   fp32 probabilities within 1e-4, the bf16 argmax agreement (the dataset must be present:
   data/fashion50, built or copied first; nothing is downloaded). Before compile: it verifies
   the whole pipeline on the GPU, where compile measures a lever.
6. compile: the bare steps again with `compile=true` (A&R first), and A&R with
   `compile=reduce-overhead` (CUDA graphs), each in a fresh process (Accelerate fixes the
   dynamo backend per process), the compile time reported apart.

The run keeps to `--minutes` (8: a 15-minute device session holds the run, its start and a
rerun; the whole may take longer, by estimate 9-15 minutes, so the sections most likely cut
are the last two): each child process (the real loop, the demo, a compiled step) is ended with
everything it started when the minutes run out, the rows measured so far are kept (a real
loop's finished epochs too), the section is reported as cut short and the later ones as not
run, and the last line gives the command that finishes the report: a rerun of some sections
(`--sections`, run in the order given) keeps the others of an earlier run of the same GPU,
libraries and commit, and compares with its bare rates (the report's state, gpu_check.json).
The in-process measurements (bare, loader, b7) are a fixed number of steps each.

    python -m scripts.bench.gpu_check [--sections bare loader loop b7 demo compile] [--minutes 8]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

import numpy as np
import pandas as pd
import torch

from common import provenance
from common.errors import UserError, cli_main
from common.fs import write_text_atomic
from ensemble.blend import load_ensemble_config
from scripts.bench.loader import make_jpegs
from scripts.bench.train import BASELINE, bare_step, median_seconds, own_process_seconds
from scripts.ops import plan
from scripts.stages import ROOT, run_module
from train.config import load_config
from train.data import loader_workers, split_train_eval, train_loader

GIB = 2**30
B2 = "effnet_b2_ablation"  # the paper's ablation setting: EfficientNet-B2, 320 px, 64 per GPU
CLASSES, PER_CLASS = 16, 125  # the loop's generated dataset: 2,000 training images
REPORT = ROOT / "results" / "gpu_check.md"
Row = tuple[str, str, str]
Rows = list[Row]


class Budget:
    """The run's time: what a child process may still take, in seconds (its timeout)."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)


UNBOUNDED = Budget(None)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "make gpu-check needs a CUDA GPU and this machine has none visible "
            "(torch.cuda.is_available() is False); run it on a GPU machine"
        )


def make_dataset(folder: Path, classes: int, per_class: int, budget: Budget = UNBOUNDED) -> Path:
    """An ImageFolder of `classes` x `per_class` generated ImageNet-size JPEGs, built by
    `python -m data_prep folder` (4 val and 1 test image per class on top)."""
    source = folder / "source"
    folders = [source / f"class_{label:02d}" for label in range(classes)]
    for path in folders:
        path.mkdir(parents=True, exist_ok=True)
    # One class per thread: PIL resizes and encodes without the GIL (24 s serially on 2 cores).
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_jpegs, folders, [per_class + 5] * classes, range(classes)))
    data = folder / "data"
    prep = ["data_prep", "folder", "--root", str(source), "--per-class", f"{per_class},4,1"]
    run_module(*prep, "--out", str(data), timeout=budget.left())
    return data


def data_overrides(data: Path, out: Path, classes: int) -> list[str]:
    return [f"data_dir={data}", f"out_dir={out}", f"num_classes={classes}", "train_splits=[train]"]


# ---- 1. bare steps and host syncs ----------------------------------------------------------
def step_rates(model: str, overrides: list[str], repeat: int, out: Path) -> dict[str, float]:
    """Images/s of the baseline and the A&R bare step, and the A&R step's model TFLOP/s."""
    cfg = load_config(model, overrides)
    rates = {}
    for name, extra in (("baseline", BASELINE), ("attract_repulse", [])):
        step, run = bare_step(model, [*overrides, *extra], str(out / name))
        rates[name] = cfg["batch_size"] / median_seconds({name: (step, None)}, repeat)[name]
        del step, run  # the model and its optimiser's memory free for the next step
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    gflops, _ = plan.forward_gflops(cfg)
    rates["tflops"] = rates["attract_repulse"] * cfg["num_views"] * plan.passes(cfg) * gflops / 1e3
    return rates


def syncs_per_update(model: str, overrides: list[str], out: Path, updates: int = 3) -> float:
    """Host syncs per optimiser step of the A&R step, as CUDA's sync debug mode reports them
    (after one warm-up step: cuDNN's benchmark and the allocator sync on first use)."""
    step, run = bare_step(model, overrides, str(out / "syncs"))
    micro = updates * run.cfg["grad_accum"]
    step()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(micro):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    return len(syncs) / updates


def bare_section(data: Path, out: Path, repeat: int, rates: dict[str, float]) -> Iterator[Row]:
    """The bare steps' rows; their rates also go into `rates`, which the later sections compare
    with."""
    overrides = data_overrides(data, out, CLASSES)
    rates.update(step_rates(B2, overrides, repeat, out))
    ratio = rates["baseline"] / rates["attract_repulse"]
    yield ("B2 320 px bf16, strong baseline bare step", f"{rates['baseline']:.0f} img/s", "")
    yield (
        "B2 320 px bf16, A&R bare step",
        f"{rates['attract_repulse']:.0f} img/s",
        f"{ratio:.2f}x slower than the baseline (arithmetic: 2.7x)",
    )
    yield ("B2 A&R model TFLOP/s", f"{rates['tflops']:.1f}", "make plan TFLOPS= for EfficientNets")
    syncs = syncs_per_update(B2, overrides, out)
    yield ("host syncs per optimiser step (A&R)", f"{syncs:g}", "goal: at most 1")


# ---- 2. the loader -------------------------------------------------------------------------
def loader_rate(model: str, overrides: list[str], batches: int) -> float:
    """Images/s of the training loader over a pass of `batches` batches (the training images
    repeated as needed), timed from its start on the second pass: the first starts the
    persistent workers and fills the page cache. Many more batches than workers: a pass begins
    one batch on every worker at once, and a short one would time that burst, not the rate."""
    cfg = load_config(model, overrides)
    images = itertools.cycle(split_train_eval(cfg)[0])
    items = list(itertools.islice(images, cfg["batch_size"] * batches))
    loader, _, _ = train_loader(cfg, items, rank=0, world=1)
    for _ in loader:
        pass
    started = time.perf_counter()
    count = sum(batch[1].shape[0] for batch in loader)
    return count / (time.perf_counter() - started)


def loader_section(data: Path, out: Path, rates: dict[str, float], batches: int) -> Rows:
    overrides = data_overrides(data, out, CLASSES)
    workers = loader_workers(load_config(B2, overrides))
    rate = loader_rate(B2, overrides, batches)
    return [
        (
            f"loader, B2 320 px, workers auto = {workers}, {batches} batches",
            f"{rate:.0f} img/s",
            f"the A&R bare step consumes {rates.get('attract_repulse', float('nan')):.0f} img/s",
        )
    ]


# ---- 3. the real loop ----------------------------------------------------------------------
def smi_names() -> list[str]:
    """nvidia-smi's name for the GPU that torch calls 0 (nvidia-smi ignores
    CUDA_VISIBLE_DEVICES: its index 0 may be another GPU of the machine)."""
    try:
        uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
    except (RuntimeError, AssertionError):  # no CUDA here: index 0 it is
        return []
    return [] if uuid is None else [f"GPU-{uuid}"]


def shared_memory() -> str:
    """/dev/shm's free space: the loader's workers pass their batches through it, and a small
    one (a container's 64 MB default) kills them with a bus error."""
    try:
        return f"/dev/shm {shutil.disk_usage('/dev/shm').free / 2**30:.1f} GiB free"
    except OSError:
        return "no /dev/shm"


class Utilisation:
    """Samples GPU 0's utilisation (%) every `every` s while active, from nvidia-smi (present
    wherever the driver is; torch.cuda.utilization would need pynvml), each with the epochs
    that `progress` (a run's metrics.csv) lists by then."""

    def __init__(self, progress: Path, every: float = 0.5):
        self.progress, self.every = progress, every
        self.samples: list[tuple[int, int]] = []  # (percent, epochs finished)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        names = [*smi_names(), "0"]
        while not self._done.wait(self.every):
            try:
                out = subprocess.run(
                    [*query, "-i", names[0]], capture_output=True, text=True, timeout=10
                )
            except subprocess.TimeoutExpired:
                continue
            except OSError:  # no nvidia-smi: the row says that no samples were taken
                return
            if out.returncode == 0 and out.stdout.strip().isdigit():
                self.samples.append((int(out.stdout.strip()), self.epochs()))
            elif len(names) > 1:  # a name this nvidia-smi does not take: the next one
                names.pop(0)

    def epochs(self) -> int:
        """The epochs finished: metrics.csv's rows (it is replaced whole, never half-written)."""
        try:
            return max(0, len(self.progress.read_text().splitlines()) - 1)
        except FileNotFoundError:
            return 0

    def steady(self) -> list[int]:
        """The samples of the epochs after the first: the launch's start-up, cuDNN's kernel
        search and the run's end would count as idle time the training does not have."""
        last = self.epochs()
        return [percent for percent, done in self.samples if 1 <= done < last]

    def __enter__(self) -> Utilisation:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


def loop_rates(
    model: str, overrides: list[str], epochs: int, budget: Budget = UNBOUNDED
) -> tuple[list[float], list[int], subprocess.TimeoutExpired | None]:
    """(img/s of each finished epoch from metrics.csv, GPU utilisation samples after the first
    epoch, the timeout if the budget ended the run) of a real `train.launch` run: a run cut short
    keeps its epochs."""
    cfg = load_config(model, overrides)
    args = [*overrides, f"epochs={epochs}", "warmup_epochs=0", "ckpt_every_steps=0"]
    metrics = Path(cfg["out_dir"]) / cfg["name"] / "metrics.csv"
    cut = None
    with Utilisation(metrics) as utilisation:
        try:
            run_module("train.launch", model, *args, timeout=budget.left())
        except subprocess.TimeoutExpired as err:
            cut = err
    per_epoch = pd.read_csv(metrics)["img_per_s"].tolist() if metrics.exists() else []
    return per_epoch, utilisation.steady(), cut


def loop_section(
    data: Path, out: Path, rates: dict[str, float], epochs: int, budget: Budget
) -> Iterator[Row]:
    for name, extra in (("attract_repulse", []), ("baseline", BASELINE)):
        overrides = [*data_overrides(data, out / f"loop-{name}", CLASSES), *extra]
        per_epoch, samples, cut = loop_rates(B2, overrides, epochs, budget)
        if per_epoch:
            yield loop_row(name, per_epoch, samples, rates.get(name, float("nan")))
        if cut:
            raise cut


def loop_row(name: str, per_epoch: list[float], samples: list[int], bare: float) -> Row:
    ratio = f"last epoch {per_epoch[-1] / bare:.2f}x the bare step"
    if samples:  # none without nvidia-smi, or before a second epoch
        ratio += (
            f", GPU busy after epoch 1 (evaluations and checkpoints included): "
            f"median {median(samples):.0f}%, mean {np.mean(samples):.0f}%"
        )
    return (f"real loop, {name}, img/s per epoch", " / ".join(f"{r:.0f}" for r in per_epoch), ratio)


# ---- 4. EfficientNet-B7 --------------------------------------------------------------------
def b7_section(repeat: int) -> Rows:
    cfg = load_config("effnet_b7")
    footprint = plan.footprint(cfg)
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    fits = plan.largest_micro_batch(footprint, plan.usable_bytes(total, footprint.params, 1))
    images = min(cfg["batch_size"], fits)
    if images < 1:
        return [("B7 448 px step", "not run", "make plan fits no image on this GPU")]
    state = plan.build_state(cfg, "cuda")
    torch.backends.cudnn.benchmark = True  # as training runs (tune_for_gpu), whatever ran before
    # Optimiser state, gradients and cuDNN's kernel search at this batch happen before the peak
    # is read: the search's trial workspaces are not the steady state that make plan estimates.
    plan.training_step(state, images, cfg["img_size"], "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    plan.training_step(state, images, cfg["img_size"], "cuda")
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated() / GIB
    estimate = footprint.bytes_at(images) / GIB
    step = (lambda: plan.training_step(state, images, cfg["img_size"], "cuda"), None)
    seconds = median_seconds({"b7": step}, repeat)["b7"]
    label = f"B7 448 px, {images} images"
    return [
        (
            f"{label}: peak allocated",
            f"{allocated:.1f} GiB",
            f"make plan: {estimate:.1f} GiB ({estimate / allocated - 1:+.0%})",
        ),
        (
            f"{label}: make plan's step (both views, NCHW)",
            f"{images / seconds:.0f} img/s",
            "plan.training_step",
        ),
    ]


# ---- 5. the demo on the GPU, and GPU/CPU agreement ------------------------------------------
def probabilities(
    model: str, overrides: list[str], out: Path, cpu: bool, budget: Budget = UNBOUNDED
) -> np.ndarray:
    """TenCrop test probabilities of `model`'s checkpoint by `python -m ensemble.logits`, kept
    in float32 (float16's steps, 2.4e-4 at p = 0.25-0.5, would hide a 1e-4 agreement)."""
    logits = out / ("cpu" if cpu else "gpu")
    args = [model, *overrides, f"logits_dir={logits}", "--float32"]
    env = {"CUDA_VISIBLE_DEVICES": ""} if cpu else None
    run_module("ensemble.logits", *args, env=env, timeout=budget.left())
    with np.load(logits / model / "test.npz", allow_pickle=False) as arrays:
        return arrays["probs"].astype(np.float64)


def agreement(cpu: np.ndarray, gpu: np.ndarray) -> tuple[float, float]:
    """(max |difference| of probabilities, % of images with the same argmax)."""
    same = (cpu.argmax(1) == gpu.argmax(1)).mean() * 100
    return float(np.abs(cpu - gpu).max()), float(same)


# `make demo`'s stages on the 2-core CPU (results/README.md, run 1 of 2026-12-01), in seconds.
CPU_DEMO_S = {
    "train demo_resnet18_w16": 99,
    "train demo_resnet34_w16": 91,
    "TenCrop logits demo_resnet18_w16": 14,
    "TenCrop logits demo_resnet34_w16": 16,
}


def demo_section(out: Path, budget: Budget) -> Iterator[Row]:
    """`make demo`'s pipeline on the GPU, stage by stage against the 2-core CPU, then one
    member's GPU/CPU agreement. A demo cut short by the budget keeps its finished stages."""
    dirs = [f"out_dir={out / 'runs'}", f"logits_dir={out / 'logits'}"]
    timings = out / "timings.json"
    demo = ["scripts.ops.demo", *dirs, "--submissions", str(out / "submissions")]
    stopped = None
    try:
        run_module(*demo, "--timings", str(timings), timeout=budget.left())
    except (subprocess.TimeoutExpired, UserError) as err:  # cut by the budget, or a stage failed
        stopped = err
    seconds = json.loads(timings.read_text()) if timings.is_file() else {}
    for stage, value in seconds.items():
        yield demo_row(stage, value, CPU_DEMO_S.get(stage))
    if stopped:
        raise stopped
    compared = sum(seconds[stage] for stage in CPU_DEMO_S)
    yield demo_row("train and TenCrop logits", compared, sum(CPU_DEMO_S.values()))
    member = load_ensemble_config("demo")["models"][0]
    yield from agreement_rows(member, dirs, out, budget)


def demo_row(stage: str, seconds: float, cpu: float | None) -> Row:
    """One stage's GPU seconds, beside the CPU's (`cpu`) where the CPU's is known."""
    against = "" if cpu is None else f"2-core CPU {cpu} s: {cpu / max(seconds, 1e-9):.1f}x faster"
    return (f"make demo on the GPU: {stage}", f"{seconds:.0f} s", against)


def agreement_rows(
    member: str, dirs: list[str], out: Path, budget: Budget = UNBOUNDED
) -> Iterator[Row]:
    """The trained `member` predicted on the CPU (fp32) and on the GPU (fp32, bf16)."""
    fp32 = [*dirs, "mixed_precision=no"]
    on_cpu = probabilities(member, fp32, out / "agree", cpu=True, budget=budget)
    for precision, goal in (("no", "fp32: within 1e-4"), ("bf16", "bf16: argmax >= 99.5%")):
        overrides = [*dirs, f"mixed_precision={precision}"]
        on_gpu = probabilities(member, overrides, out / precision, False, budget)
        worst, same = agreement(on_cpu, on_gpu)
        yield (
            f"{member} TenCrop, GPU {precision} vs CPU fp32",
            f"max |dp| {worst:.2e}, argmax equal {same:.2f}%",
            goal,
        )


# ---- 6. torch.compile ----------------------------------------------------------------------
# (step, its overrides, the `compile` value): inductor on both steps (A&R, the goal's step,
# first), then CUDA graphs on A&R.
COMPILED = (
    ("attract_repulse", [], "true"),
    ("baseline", BASELINE, "true"),
    ("attract_repulse", [], "reduce-overhead"),
)


def compile_section(
    data: Path, out: Path, repeat: int, rates: dict[str, float], budget: Budget = UNBOUNDED
) -> Iterator[Row]:
    for name, extra, mode in COMPILED:
        check = f"B2 {name} bare step, compile={mode}"
        overrides = [*data_overrides(data, out / f"compile-{name}-{mode}", CLASSES), *extra]
        compiled = [*overrides, f"compile={mode}"]
        try:
            timing = own_process_seconds(B2, compiled, repeat, budget.left())
        except SystemExit as err:  # how the child's failure arrives: the other modes still run
            yield (check, "failed", str(err).strip().splitlines()[-1][:300])
            continue
        rate = load_config(B2, overrides)["batch_size"] / timing["c"]
        eager = rates.get(name, float("nan"))
        against = f"{rate / eager:.2f}x eager; compile {timing['first']:.0f} s once; "
        against += f"{timing['graph_breaks']} graph breaks"
        if mode == "reduce-overhead":  # inductor falls back without graphs, and only logs it
            against += f", CUDA graphs skipped {timing['cudagraph_skips']}x"
        yield (check, f"{rate:.0f} img/s", against)


# ---- the report ----------------------------------------------------------------------------
def table(rows: Rows) -> str:
    lines = ["| check | measured | against |", "|---|--:|---|"]
    lines += [f"| {check} | {value} | {against} |" for check, value, against in rows]
    return "\n".join(lines)


class Report:
    """Sections as they finish: printed, and the report rewritten with every section so far.
    Its state beside it (gpu_check.json: each section's table, the bare steps' rates) lets a
    rerun of some sections finish an earlier report of the same GPU and code: the sections
    not rerun are kept, and the rerun ones compare with the earlier bare rates."""

    def __init__(self, path: Path, header: str, key: str):
        self.path, self.state_path, self.header = path, path.with_suffix(".json"), header
        self.state = self._earlier(key) or {"key": key, "sections": {}, "rates": {}}
        self._write()  # a run that dies still says what it was

    def _earlier(self, key: str) -> dict | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("key") == key else None

    @property
    def rates(self) -> dict[str, float]:
        """The bare steps' rates (the bare section fills them; the later ones read them)."""
        return self.state["rates"]

    def add(self, name: str, rows: Rows, seconds: float) -> None:
        text = f"## {name} ({seconds:.0f} s, {time.strftime('%H:%M')})\n\n{table(rows)}"
        print(f"\n{text}", flush=True)
        self.state["sections"][name] = text
        self._write()

    def _write(self) -> None:
        done = self.state["sections"]
        parts = [self.header, *(done[name] for name in SECTIONS if name in done)]
        write_text_atomic(self.state_path, json.dumps(self.state, indent=1) + "\n")
        write_text_atomic(self.path, "\n\n".join(parts) + "\n")


PROG = "python -m scripts.bench.gpu_check"
SECTIONS = ("bare", "loader", "loop", "b7", "demo", "compile")
COMPARED = ("loader", "loop", "compile")  # their ratios are to the bare steps


def measure(name: str, section: Callable[[], Iterable[Row]], budget: Budget) -> tuple[Rows, bool]:
    """(The section's rows, whether it finished): what it measured before it failed or the
    budget ran out is kept, and a last row says which."""
    if budget.left() == 0:
        return [(name, "not run", "the time budget (--minutes) was spent")], False
    rows: Rows = []
    try:
        for row in section():
            rows.append(row)
    except subprocess.TimeoutExpired:
        return [*rows, (name, "cut short", "the time budget (--minutes) ran out")], False
    except Exception as err:  # noqa: BLE001 (one device session: measure the rest)
        error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        return [*rows, (name, "failed", error)], False
    return rows, True


def run_sections(
    sections: dict[str, Callable[[], Iterable[Row]]], report: Report, budget: Budget
) -> list[str]:
    """Each section's rows into the report as it finishes; returns those to run again."""
    again = []
    for name, section in sections.items():
        begun = time.perf_counter()
        print(f"\ngpu-check: {name} ...", flush=True)
        rows, finished = measure(name, section, budget)
        if not finished:
            again.append(name)
        report.add(name, rows, time.perf_counter() - begun)
        # What a section held is free for the next (B7's peak memory is read there): the
        # collector first, for the models Accelerate's wrappers keep in reference cycles.
        # After a device-side error every CUDA call fails: the next sections report it.
        gc.collect()
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
    return again


def chosen_sections(asked: Sequence[str], rates: dict[str, float]) -> list[str]:
    """`asked` in its order (once each), with bare first where a section compares with the
    bare steps and no earlier run of this GPU and code measured them."""
    names = list(dict.fromkeys(asked))
    if "bare" not in names and not rates and any(name in COMPARED for name in names):
        names.insert(0, "bare")
    return names


def rerun_command(sections: list[str], report: Path) -> str:
    """The make command that finishes this report: the same python, the same report file."""
    args = ["--sections", *sections] + ([] if report == REPORT else ["--report", str(report)])
    python = "" if Path(sys.executable) == ROOT / ".venv" / "bin" / "python" else sys.executable
    return f'make gpu-check{f" PY={python}" if python else ""} ARGS="{" ".join(args)}"'


def environment(dirty_flag: bool = True) -> str:
    """The libraries and the code the figures come from; without `dirty_flag`, what a rerun
    must match (a first run's own report files make the tree dirty)."""
    found, code = provenance.versions(), provenance.code_state()
    dirty = " (dirty)" if dirty_flag and code["git_dirty"] else ""
    commit = (code["git_commit"] or "unknown")[:10] + dirty
    return (
        f"torch {found['torch']} (CUDA {torch.version.cuda}), timm {found['timm']}, "
        f"accelerate {found['accelerate']}, Python {found['python']}, commit {commit}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per measurement")
    parser.add_argument(
        "--loader-batches", type=int, default=128, help="batches a timed pass of the loader takes"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the real loop")
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="the whole run's time, dataset included"
    )
    return parser.parse_args(argv)


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda()
    started, budget = time.perf_counter(), Budget(args.minutes)
    device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    header = (
        f"# make gpu-check, {time.strftime('%Y-%m-%d')}\n\n{device}, {environment()}, "
        f"{shared_memory()}; "
        f"`{PROG} --sections {' '.join(args.sections)} "
        f"--minutes {args.minutes:g}`"
    )
    print(header, flush=True)
    report = Report(args.report, header, key=f"{device}, {environment(dirty_flag=False)}")
    rates = report.rates
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        # Built by the first section that needs it, inside it: a failed build is that
        # section's row, and b7 or demo alone build none.
        data = functools.cache(lambda: make_dataset(folder, CLASSES, PER_CLASS, budget))
        sections: dict[str, Callable[[], Iterable[Row]]] = {
            "bare": lambda: bare_section(data(), folder / "bare", args.repeat, rates),
            "loader": lambda: loader_section(data(), folder / "loader", rates, args.loader_batches),
            "loop": lambda: loop_section(data(), folder, rates, args.epochs, budget),
            "b7": lambda: b7_section(args.repeat),
            "compile": lambda: compile_section(data(), folder, args.repeat, rates, budget),
            "demo": lambda: demo_section(folder / "demo", budget),
        }
        chosen = {name: sections[name] for name in chosen_sections(args.sections, rates)}
        again = run_sections(chosen, report, budget)
    print(f"\ngpu-check: {(time.perf_counter() - started) / 60:.1f} min; {args.report}")
    if again:
        print(f"gpu-check: to finish, run: {rerun_command(again, args.report)}")


if __name__ == "__main__":
    main()

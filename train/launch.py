"""`make train`: `accelerate launch` with launch settings that fit this machine.

Without `--config_file`, the settings come from configs/accelerate/: every visible GPU on one
machine, or one CPU process (`--num_processes N` for N CPU processes). CPU machines need care:
`accelerate launch --cpu --num_processes N` starts a single process, so N > 1 CPU processes are
launched as `--multi_gpu` and train/distributed.py puts them on the CPU (gloo).

The launcher relays SIGTERM/SIGUSR1 to the training processes alone (accelerate's launcher does
not relay), as SIGUSR1 (PREEMPT_SIGNAL), each once it catches it (a stop that comes while they
start waits for them), and exits with EXIT_PREEMPTED when they stopped on it, so a job script can
requeue: torchrun's agent, between them, is left alone to see them end (common/status.py
`status_for_agent`), and ignores the stop signals when they reach it too (SLURM signals every
process of a job step). Other failures exit with the status the training processes recorded: 2
for a user error, as `python -m train` does.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.errors import UserError, cli_main
from common.processes import (
    available_cpus,
    catches,
    children,
    command_line,
    process_tree,
    running,
)
from common.status import EXIT_PREEMPTED, EXIT_STATUS_ENV, launch_status_file, read_exit_status
from common.yamlio import load_yaml
from train.config import CONFIG_DIR, load_config
from train.stop import CTRL_C, write_stderr

# `accelerate launch` itself, through the module behind it (wrapped by train/agent.py, which
# leaves out torchrun's report of bad input): the same parser and launchers, without the CLI's
# other commands, whose imports (timm among them) are half of its 4 s of start-up on 2 cores;
# and no `accelerate` script looked for beside a python that may not have one.
ACCELERATE_LAUNCH = [sys.executable, "-m", "train.agent"]


# One entry per GPU wherever the NVIDIA driver is loaded, nvidia-smi installed or not.
NVIDIA_DRIVER = Path("/proc/driver/nvidia/gpus")


def cuda_count() -> int:
    """CUDA's own count (it reads CUDA_VISIBLE_DEVICES), where nvidia-smi cannot answer: rather
    than a GPU machine's run silently on its CPU. torch is imported only here (start-up time)."""
    import torch

    return torch.cuda.device_count()


def gpu_count() -> int:
    """The GPUs this launch may use: those nvidia-smi lists (it ignores CUDA_VISIBLE_DEVICES),
    at most as many as CUDA_VISIBLE_DEVICES names before its first empty or negative entry
    (where CUDA stops reading it), so that no process is started for a hidden GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    named = None
    if visible is not None:
        entries = itertools.takewhile(lambda e: e and not e.startswith("-"), visible.split(","))
        named = sum(1 for _ in entries)
        if named == 0:
            return 0  # every GPU hidden: nvidia-smi is not asked (it may be what hangs)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except OSError:  # no nvidia-smi: a CPU machine, unless the driver is loaded (a slim image)
        return cuda_count() if any(NVIDIA_DRIVER.glob("*")) else 0
    except subprocess.TimeoutExpired:
        raise UserError(
            "nvidia-smi gave no answer in 30 s (a hung GPU driver?); fix the driver, or set "
            "CUDA_VISIBLE_DEVICES= to train on the CPU"
        ) from None
    if out.returncode != 0:  # there but failing
        return cuda_count()
    present = out.stdout.count("GPU ")
    return present if named is None else min(present, named)


def launch_args(config_file: str | None, num_processes: int | None, gpus: int) -> list[str]:
    """The `accelerate launch` options for this machine and request."""
    if config_file is None:
        if gpus > 0:
            if num_processes and num_processes > gpus:
                # Accelerate would put process k on cuda:k and fail on an invalid ordinal.
                raise UserError(
                    f"--num_processes {num_processes} on {gpus} GPU(s): one process per GPU; "
                    f"pass at most {gpus}, or CUDA_VISIBLE_DEVICES= for CPU processes"
                )
            procs = num_processes or gpus
            name = "gpu.yaml" if procs > 1 else "gpu_1proc.yaml"
        else:
            procs = num_processes or 1
            name = "cpu.yaml" if procs == 1 else "cpu_2proc.yaml"
        args = ["--config_file", str(CONFIG_DIR / "accelerate" / name)]
        return args + ["--num_processes", str(procs), *cpu_threads(gpus, procs)]
    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"accelerate config {path} does not exist; pass an existing file")
    settings = load_yaml(path.read_text()) or {}
    procs = num_processes or int(settings.get("num_processes", 1))
    args = ["--config_file", str(path), "--num_processes", str(procs)]  # the file's, or asked for
    if gpus == 0 and procs > 1 and settings.get("distributed_type") != "MULTI_GPU":
        print(f"launch: {path} asks for {procs} CPU processes; launching them as --multi_gpu")
        args.append("--multi_gpu")
    return args + cpu_threads(gpus, procs)


def cpu_threads(gpus: int, procs: int) -> list[str]:
    """On the CPU, the cores shared out between the processes (accelerate warns when it has to
    guess this itself), or OMP_NUM_THREADS where the caller set it (accelerate would overwrite
    it): a launched run then has the threads a direct `python -m train` has, and their results
    stay bit-identical (`make test` gives each of its workers one)."""
    if gpus > 0:
        return []
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not threads.isdigit() or int(threads) < 1:
        threads = str(max(1, available_cpus() // procs))
    return ["--num_cpu_threads_per_process", threads]


def run(command: list[str], agent: bool) -> int:
    """Run the launcher in a session of its own, relaying stop signals to the training processes;
    exit with their own status where accelerate reports only 1 (or, under torchrun's agent, 0).
    `agent`: several processes, under torchrun's agent."""
    with launch_status_file() as status_file:
        code, relayed, interrupted = _run_relaying(
            command, {**os.environ, EXIT_STATUS_ENV: status_file}
        )
        recorded = read_exit_status(status_file)
    if agent and recorded == EXIT_PREEMPTED and code != 0 and not relayed:
        # A stop nobody sent: the agent SIGTERMs the rest when a process crashes (one that
        # records nothing first), and a stopped process exits 0 under it: the agent's failure
        # is the crash's, not a preemption for the job to requeue. (One process exits 75 to
        # accelerate's plain launcher, which reports 1: a `kill` of it alone is a stop.)
        return code
    if recorded is not None and (code != 0 or recorded == EXIT_PREEMPTED):
        return recorded  # a stopped run under torchrun's agent exits 0 with 75 recorded
    return EXIT_PREEMPTED if relayed and not interrupted and code != 0 else code


# What the training processes get for a SIGTERM or SIGUSR1: they stop on either, checkpoint in
# their own time (bounded by stop_timeout_s) and exit. Nothing else is signalled: torchrun's agent
# (accelerate's --multi_gpu launcher: every multi-process run, on GPUs or CPUs) prints a 20-line
# traceback on SIGTERM and SIGKILLs its workers 30 s later, checkpoint written or not; ended by
# SIGUSR1, it takes down the store that the workers' NCCL polls, which then logs an error each
# second of the checkpoint; and accelerate's own probes (nvidia-smi) would take the stop instead.
PREEMPT_SIGNAL = signal.SIGUSR1
POLL_S = 0.2  # how soon a stop reaches a training process that has just begun to catch it
# SLURM signals every process of a job step (srun forwards a signal to the step's whole cgroup):
# the launcher's tree ignores the stop signals, torchrun's agent does not take them over
# (`--signals-to-handle`, read from PET_SIGNALS_TO_HANDLE: its default adds SIGTERM), and the
# training processes, which start ignoring them, catch them first thing (train/__main__.py).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGENT_SIGNALS = {"PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}


def ignore_stops() -> None:
    """In the launcher's child before it runs accelerate: an ignored signal stays ignored
    across exec, for its children too."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def training_processes(launcher: int) -> list[int]:
    """The launcher's children that run `python [-u] -m train` (accelerate's plain launcher and
    torchrun start them; not its probes)."""
    return [pid for pid in children(launcher) if runs_module(command_line(pid), "train")]


def runs_module(argv: list[str], module: str) -> bool:
    return any(argv[k : k + 2] == ["-m", module] for k in range(len(argv) - 1))


def _run_relaying(command: list[str], env: dict[str, str]) -> tuple[int, bool, bool]:
    """(The launcher's status, whether a stop came, whether a Ctrl-C interrupted the processes
    after it). A stop is kept until every training process has it: each is told once it catches
    the signal (train/__main__.py installs that first thing), so a stop that comes while
    accelerate starts them is neither lost nor fatal. A first Ctrl-C is such a stop; another (or
    one after a stop) goes to the whole tree at once, as a terminal would send it, and the
    training processes quit without a checkpoint."""
    stops: list[int] = []
    told: set[int] = set()
    interrupted: set[int] = set()
    process: subprocess.Popen | None = None

    def on_stop(signum, frame):
        stops.append(signum)

    def on_interrupt(signum, frame):
        if not stops:  # the first Ctrl-C: a stop, relayed as the others (with a checkpoint)
            stops.append(signum)
            write_stderr(f"\n{CTRL_C}\n")
            return
        for pid in process_tree(process.pid) if process else []:
            interrupted.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

    # Before the launcher starts: no signal can find this process without its handler.
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGINT, on_interrupt)
    process = subprocess.Popen(
        command, start_new_session=True, env={**env, **AGENT_SIGNALS}, preexec_fn=ignore_stops
    )
    while True:
        try:
            code = process.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        for pid in training_processes(process.pid) if stops else []:
            if pid not in told and catches(pid, PREEMPT_SIGNAL):
                told.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, PREEMPT_SIGNAL)
    while any(running(pid) for pid in interrupted):  # after Ctrl-C, workers outlive the agent
        time.sleep(0.5)
    return code, bool(stops), bool(interrupted)


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.launch", description=__doc__)
    parser.add_argument("--config_file", help="your own accelerate config")
    parser.add_argument("--num_processes", type=int, help="processes (default: GPUs, or 1 CPU)")
    parser.add_argument("--accelerate-args", default="", help="more `accelerate launch` options")
    parser.add_argument("model")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    load_config(args.model, args.overrides)  # refuse a bad config before starting processes
    options = launch_args(args.config_file, args.num_processes, gpu_count())
    options += shlex.split(args.accelerate_args)
    # --quiet: a failing run has printed its one-line error; no launcher traceback after it.
    command = [*ACCELERATE_LAUNCH, "--quiet", *options, "-m", "train", args.model]
    agent = int(options[options.index("--num_processes") + 1]) > 1
    return run(command + args.overrides, agent)


if __name__ == "__main__":
    sys.exit(main())

"""make train's launcher settings and the SLURM job it can generate."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from common.errors import UserError, cli_main, sigterm_held
from common.processes import children, kill_tree
from common.status import (
    EXIT_PREEMPTED,
    EXIT_STATUS_ENV,
    read_exit_status,
    record_exit_status,
    status_for_agent,
    user_error_recorded,
)
from tests import fake_slurm
from tests.conftest import NARROW, ROOT, run_command
from train import agent, launch, slurm
from train.launch import ACCELERATE_LAUNCH, gpu_count, launch_args, runs_module


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_a_cpu_machine_gets_one_process_with_every_core_by_default(monkeypatch):
    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = launch_args(None, None, gpus=0)
    assert option(args, "--num_processes") == "1" and args[1].endswith("cpu.yaml")
    assert option(args, "--num_cpu_threads_per_process") == "8"


def test_threads_set_by_the_caller_are_kept_and_nonsense_is_ignored(monkeypatch):
    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert option(launch_args(None, 2, gpus=0), "--num_cpu_threads_per_process") == "1"
    for nonsense in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", nonsense)
        assert option(launch_args(None, 2, gpus=0), "--num_cpu_threads_per_process") == "4"


def test_several_cpu_processes_are_launched_as_multi_gpu_so_that_they_really_start(monkeypatch):
    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args = launch_args(None, 2, gpus=0)
    config = yaml.safe_load(open(args[1]))
    assert config["distributed_type"] == "MULTI_GPU" and option(args, "--num_processes") == "2"
    assert option(args, "--num_cpu_threads_per_process") == "4"  # the cores shared out


@pytest.mark.slow
def test_accelerate_launch_prints_no_values_not_passed_warning(tiny_dir, tmp_path):
    out = run_command(
        "-m",
        "train.launch",
        "demo_resnet18",
        NARROW,
        "epochs=1",
        "batch_size=8",
        "workers=0",
        f"data_dir={tiny_dir}",
        f"out_dir={tmp_path}",
        "train_splits=[train]",
        "eval_every=1",
    )
    assert "were not passed" not in out.stdout + out.stderr
    assert (tmp_path / "demo_resnet18" / "metrics.csv").is_file()


def test_every_machines_options_parse_under_accelerates_own_launch_command(monkeypatch):
    """The launcher runs `accelerate launch` as its module, under this python: the parser
    that module's main() uses must take what launch_args gives for each kind of machine."""
    from accelerate.commands.launch import launch_command_parser

    assert ACCELERATE_LAUNCH == [sys.executable, "-m", "train.agent"]
    assert agent.accelerate_launch.__module__ == "accelerate.commands.launch"
    monkeypatch.setattr(launch, "available_cpus", lambda: 8)
    for procs, gpus in ((None, 0), (2, 0), (None, 4), (None, 1), (1, 4)):
        options = launch_args(None, procs, gpus)
        parsed = launch_command_parser().parse_args([*options, "-m", "train", "effnet_b7"])
        assert parsed.config_file == options[1] and parsed.module
        assert parsed.num_processes == int(option(options, "--num_processes"))
        assert parsed.training_script_args == ["effnet_b7"]


def test_the_agents_log_folder_is_the_launchs_own_unless_logs_are_asked_for():
    """The folder train/agent.py names with `--log_dir` parses as accelerate's option; a user's
    `--tee` or log folder keeps torchrun's own behaviour. Options after the module are its own."""
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(["--log_dir", "/logs", "-m", "train", "demo"])
    assert parsed.log_dir == "/logs" and parsed.training_script_args == ["demo"]
    for options in (
        ["--tee", "3"],
        ["-t", "3"],
        ["--log_dir=/mine"],
        ["--quiet", "--log_dir", "x"],
    ):
        assert agent.asks_for_logs([*options, "-m", "ensemble.logits", "tiny.yaml"]), options
    for options in ([], ["--quiet", "--num_processes", "2"]):
        assert not agent.asks_for_logs([*options, "-m", "train", "demo", "--log_dir", "x"])


def test_a_users_cpu_config_with_several_processes_is_corrected(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("distributed_type: 'NO'\nuse_cpu: true\nnum_processes: 2\n")
    assert "--multi_gpu" in launch_args(str(user), None, gpus=0)
    assert option(launch_args(str(user), None, gpus=0), "--num_processes") == "2"  # the file's
    assert "--multi_gpu" not in launch_args(str(user), None, gpus=8)


def test_gpus_are_all_used():
    args = launch_args(None, None, gpus=4)
    assert args[1].endswith("gpu.yaml") and option(args, "--num_processes") == "4"
    assert "--num_cpu_threads_per_process" not in args


def test_a_stopped_process_under_torchruns_agent_exits_0_having_recorded_75(tmp_path, monkeypatch):
    """So that the agent ends quietly, after its workers, and the launcher still reports 75."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path / "status"))
    assert status_for_agent(EXIT_PREEMPTED) == EXIT_PREEMPTED  # the plain launcher: no agent
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert status_for_agent(EXIT_PREEMPTED) == 0
    assert status_for_agent(2) == 2 and status_for_agent(0) == 0
    monkeypatch.delenv(EXIT_STATUS_ENV)
    assert status_for_agent(EXIT_PREEMPTED) == EXIT_PREEMPTED  # no launcher to tell


def test_one_gpu_process_takes_accelerates_plain_launcher_not_torchrun():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    for procs, gpus in ((None, 1), (1, 8)):
        options = launch_args(None, procs, gpus)
        assert options[1].endswith("gpu_1proc.yaml")
        parsed = launch_command_parser().parse_args([*options, "-m", "train", "effnet_b7"])
        validated = _validate_launch_command(parsed)[0]
        assert not validated.multi_gpu and not validated.cpu and validated.num_processes == 1
        assert validated.mixed_precision == "bf16"


def test_more_processes_than_gpus_are_refused_in_one_line():
    assert option(launch_args(None, 2, gpus=4), "--num_processes") == "2"
    with pytest.raises(UserError, match="--num_processes 2 on 1 GPU"):
        launch_args(None, 2, gpus=1)


def test_the_gpus_counted_are_those_cuda_visible_devices_leaves_visible(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"  # a node of eight GPUs, as nvidia-smi -L lists them
    fake.write_text('#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100"; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_count() == 8
    for visible, count in (("0,1", 2), ("3", 1), ("", 0), ("2,-1,3", 1), ("0,1,2,3,4,5,6,7,8", 8)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpu_count() == count, visible


def test_an_nvidia_smi_that_fails_or_is_missing_beside_a_driver_leaves_the_count_to_cuda(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # conftest hides the GPU
    monkeypatch.setattr("torch.cuda.device_count", lambda: 3)
    driver = tmp_path / "gpus"
    monkeypatch.setattr(launch, "NVIDIA_DRIVER", driver)
    assert gpu_count() == 0  # no nvidia-smi, no driver: a CPU machine
    (driver / "0000:18:00.0").mkdir(parents=True)
    assert gpu_count() == 3  # no nvidia-smi in a slim image on a GPU machine
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    assert gpu_count() == 3
    fake.write_text("#!/bin/sh\nsleep 60\n")  # a hung driver: not asked once every GPU is hidden
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count() == 0


def test_the_generated_slurm_job_is_valid_shell_that_requeues_on_the_early_signal(tmp_path):
    job = run_command("-m", "train.slurm", "effnet_b7", "epochs=460", "--nodes", "4").stdout
    path = tmp_path / "job.sh"
    path.write_text(job)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --signal=B:USR1@" in job and "#SBATCH --requeue" in job
    assert "scontrol requeue" in job and "--num_processes $(( 4 * 8 ))" in job
    assert "-m train.launch" in job and "effnet_b7 epochs=460" in job
    # The interpreter that wrote the job runs it (make's VENV, wherever it is), on every node,
    # from the folder it was written in, wherever it is resubmitted from.
    assert f"\nexport python={shlex.quote(sys.executable)}\n" in job
    assert 'exec "$python" -m train.launch' in job
    assert f"\ncd {shlex.quote(os.getcwd())}\nexport PYTHONPATH={shlex.quote(str(ROOT))}\n" in job
    assert fake_slurm.directives(job)["output"] == f"{os.getcwd()}/runs/effnet_b7/slurm-%j.out"


def slurm_stand_ins(bin_dir: Path, srun: str, **more: str) -> dict[str, str]:
    """The environment of a job run under bash as node 0 of job 7: `srun` runs the bash lines
    `srun`, `scontrol requeue` leaves a file `requeued` beside `bin_dir`; `more`: other commands
    (their whole text)."""
    bin_dir.mkdir()
    requeued = bin_dir.parent / "requeued"
    stand_ins = {
        "srun": f"#!/bin/bash\n{srun}\n",
        "scontrol": f"#!/bin/bash\n[ $1 = requeue ] && touch {requeued} || echo node0\n",
        **more,
    }
    for name, text in stand_ins.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env | {"SLURM_JOB_NODELIST": "node0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7"}


@pytest.mark.parametrize(
    ("status", "new_checkpoint", "requeued"),
    [(75, False, True), (1, True, True), (1, False, False), (2, True, False), (0, True, False)],
)
def test_a_training_job_requeues_after_a_stop_or_a_failure_that_made_progress_only(
    tmp_path, capsys, status, new_checkpoint, requeued
):
    """A failure with no new checkpoint since the job started (a crash at the same step, a
    CUDA error at evaluation) would fail again after each requeue, holding the GPUs for ever."""
    out = tmp_path / "out"
    run = out / "demo_resnet18"
    (run / "checkpoints" / "step_000000004").mkdir(parents=True)
    (run / "checkpoints" / "step_000000004" / "COMPLETE").touch()
    slurm.main(["demo_resnet18", f"out_dir={out}", "--nodes", "1"])
    job = capsys.readouterr().out
    made = run / "checkpoints" / "step_000000009"
    train = f"mkdir -p {made} && touch {made}/COMPLETE\n" if new_checkpoint else ""
    env = slurm_stand_ins(tmp_path / "bin", f"{train}exit {status}")
    proc = subprocess.run(["bash", "-c", job], env=env, capture_output=True, text=True)
    assert proc.returncode == status, proc.stderr
    assert (tmp_path / "requeued").exists() == requeued


def test_a_sigterm_to_the_batch_shell_is_relayed_and_waits_for_the_checkpoint_no_requeue(
    tmp_path, capsys
):
    """A preemption or scancel may SIGTERM the batch shell: ending there ends the job, and
    SLURM then kills the training processes in the middle of their checkpoint. The job is not
    requeued (a preemption's requeue is the cluster's PreemptMode)."""
    slurm.main(["demo_resnet18", f"out_dir={tmp_path / 'out'}", "--nodes", "1"])
    job = capsys.readouterr().out
    # srun: a training run that checkpoints for 1 s on SIGTERM, then exits 75
    env = slurm_stand_ins(
        tmp_path / "bin", "trap 'kill $!; sleep 1; exit 75' TERM\nsleep 30 & wait"
    )
    proc = subprocess.Popen(["bash", "-c", job], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 75 and "TERM: checkpointing before the job ends" in out
    assert not (tmp_path / "requeued").exists()  # a scancel means stop


def test_a_multi_node_job_passes_each_override_as_one_word_spaces_and_quotes_kept(tmp_path):
    out = tmp_path / "my runs"
    overrides = [f"out_dir={out}", "name=it's"]
    job = run_command("-m", "train.slurm", "demo_resnet18", *overrides, "--nodes", "2").stdout
    bin_dir = tmp_path / "my bin"  # a space in the interpreter's path, too
    env = slurm_stand_ins(  # srun runs its command here; the python prints what it was given
        bin_dir,
        'while [[ $1 == --* ]]; do shift; done\nexec "$@"',
        python=f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n",
    )
    python = f"\nexport python={shlex.quote(sys.executable)}\n"
    job = job.replace(python, f"\nexport python={shlex.quote(str(bin_dir / 'python'))}\n")
    proc = subprocess.run(["bash", "-c", job], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout.strip().splitlines()[-1])
    assert argv[-3:] == ["demo_resnet18", *overrides]
    directives = fake_slurm.directives(job)  # as sbatch reads them: the shell's quotes
    assert directives["job-name"] == "it's"
    assert directives["output"] == f"{out}/it's/slurm-%j.out"


GRACE_S = 3  # torchrun's agent: SIGKILL this long after its SIGTERM to the workers
SLOW_CHECKPOINT = """
import time

from train.run import Run

_save = Run.save


def save(self):  # the stop's checkpoint outlasts torchrun's grace period
    if self.stop.requested:
        time.sleep({delay})
    return _save(self)


Run.save = save
"""


# A stand-in for accelerate: a probe child first (its nvidia-smi), then the training process,
# which catches the stop only after a start-up; it stops as under torchrun's agent (75 recorded,
# exit 0), and the launcher exits with the training process's status, as the agent does.
MARK = "lambda *a: open(sys.argv[-1] + '/{name}', 'w').close()"
PROBE = (
    "import signal, sys, time\n"
    f"signal.signal(signal.SIGUSR1, {MARK.format(name='probe')}); time.sleep(30)\n"
)
WORKER = (
    "import os, signal, sys, time; time.sleep(0.5)\n"
    "def stop(*args):\n"
    "    open(sys.argv[-1] + '/worker', 'w').close()\n"
    "    open(os.environ['PIPELINE_EXIT_STATUS_FILE'], 'w').write('75')\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGUSR1, stop); time.sleep(30)\n"
)
LAUNCHER = (
    "import signal, subprocess, sys, time\n"
    f"signal.signal(signal.SIGUSR1, {MARK.format(name='launcher')})\n"
    "probe = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[-1]])\n"
    "time.sleep(1.5); probe.kill(); probe.wait()\n"
    "worker = subprocess.Popen([sys.executable, '-c', sys.argv[2], '-m', 'train', sys.argv[-1]])\n"
    "sys.exit(worker.wait())\n"
)


def test_a_stop_reaches_the_training_process_alone_even_before_it_exists(tmp_path):
    """SIGTERM while the launcher runs its probe: kept until the training process catches
    it, and given to nobody else (not the probe, not the launcher: torchrun's agent)."""
    launcher = [sys.executable, "-c", LAUNCHER, PROBE, WORKER, str(tmp_path)]
    code = f"import sys; from train.launch import run; sys.exit(run({launcher!r}, agent=True))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while not children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)  # the relay is in place before the launcher starts
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    assert sorted(path.name for path in tmp_path.iterdir()) == ["worker"]


def test_the_relay_finds_training_processes_by_their_module():
    assert runs_module(["python", "-u", "-m", "train", "effnet_b7"], "train")
    assert runs_module(["python", "-c", "code", "-m", "train", "x"], "train")
    assert not runs_module(["python", "-m", "train.launch", "m"], "train")
    assert not runs_module(["nvidia-smi", "--query-gpu=count"], "train")


TWO_PROCESS_RUN = [
    "demo_resnet18",
    NARROW,
    "epochs=2",
    "batch_size=4",
    "workers=0",
    "ckpt_every_steps=0",
]


def stop_two_process_launch(tmp_path, args: list[str], stop) -> tuple[int, str, float]:
    """(status, output, seconds from the stop to the end) of a 2-process `train.launch` whose
    stop checkpoint outlasts torchrun's grace, `stop(launcher)` called in its first epoch."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_CHECKPOINT.format(delay=GRACE_S + 5))
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.launch", "--num_processes", "2", *args],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(GRACE_S),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    config = tmp_path / "out" / "demo_resnet18" / "config.yaml"
    deadline = time.monotonic() + 300
    while not config.is_file() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    time.sleep(1)  # into the first epoch
    stopped = time.monotonic()
    stop(proc)
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output, time.monotonic() - stopped


def two_process_launch_with(tmp_path, hook: str, args: list[str]) -> subprocess.CompletedProcess:
    """A 2-process `train.launch` whose processes first run `hook` (their sitecustomize)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(hook)
    return subprocess.run(
        [sys.executable, "-m", "train.launch", "--num_processes", "2", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        timeout=300,
    )


FULL_ON_RANK_1 = """
import errno, os

import train.checkpoint as checkpoint

_save = checkpoint._save_tensor_file


def save(path, obj):  # the second process's disk fills at its first checkpoint's RNG file
    if os.environ.get("RANK") == "1" and path.name == "rng_rank1.pt":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    _save(path, obj)


checkpoint._save_tensor_file = save
"""


@pytest.mark.slow
def test_a_full_disk_on_one_process_stops_every_process_with_its_line(tiny_dir, tmp_path):
    """The failing process alone raising left the other in the next collective until the
    launcher's timeout (and its cleanup removed the folder the main process was writing in)."""
    out = tmp_path / "out"
    args = [*TWO_PROCESS_RUN, f"data_dir={tiny_dir}", f"out_dir={out}", "ckpt_every_steps=2"]
    started = time.monotonic()
    proc = two_process_launch_with(tmp_path, FULL_ON_RANK_1, args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 150  # not a collective's timeout
    checkpoints = out / "demo_resnet18" / "checkpoints"
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr  # no report
    [line] = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert line.startswith(
        f"error: no space left in {checkpoints} for checkpoint step 2 (No space left on device); "
    ), proc.stderr
    assert list(checkpoints.iterdir()) == []  # the partial folder removed, nothing sealed


BAD_INPUT_ON_RANK_1 = """
import os, threading

import train.run as run
from common.errors import UserError

_step = run.Run.train_step


def step(self, *args, **kwargs):  # in epoch 2, process 1 fails; process 0 waits on it for good
    if self.epoch == 1:
        if os.environ.get("RANK") == "1":
            raise UserError("bad input seen by process 1 alone")
        threading.Event().wait()  # as in an NCCL collective whose peer has gone
    return _step(self, *args, **kwargs)


run.Run.train_step = step
"""


@pytest.mark.slow
def test_bad_input_on_one_process_exits_2_in_its_line_though_the_other_then_stops_late(
    tiny_dir, tmp_path
):
    """torchrun's agent SIGTERMs the process left waiting, which after stop_timeout_s records
    75: that turned bad input into a requeue. The first status recorded now stands, and the
    agent's 40-line report of the failure is left out."""
    args = [*TWO_PROCESS_RUN, f"data_dir={tiny_dir}", f"out_dir={tmp_path}", "stop_timeout_s=2"]
    proc = two_process_launch_with(tmp_path, BAD_INPUT_ON_RANK_1, args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: bad input seen by process 1 alone" in proc.stderr
    assert "error: process 0 stopped after another process's error above" in proc.stderr
    assert "stop_timeout_s" not in proc.stderr  # not the deadline of a stop nobody asked for
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert "closing signal" not in proc.stderr  # the agent's log of the failure, left out too


def test_a_stop_nobody_sent_after_a_crash_is_a_failure_not_a_preemption(tmp_path):
    """A process crashed without recording; the agent's SIGTERM left another stuck past
    stop_timeout_s, which recorded 75: the job must not requeue a crash."""
    record_75 = f"import os; open(os.environ['{EXIT_STATUS_ENV}'], 'x').write('75')"
    recorded_75_then_failed = f"{record_75}; raise SystemExit(1)"
    assert launch.run([sys.executable, "-c", recorded_75_then_failed], agent=True) == 1
    stopped_cleanly = recorded_75_then_failed.replace("SystemExit(1)", "SystemExit(0)")
    assert launch.run([sys.executable, "-c", stopped_cleanly], agent=True) == EXIT_PREEMPTED
    # One process: accelerate's plain launcher reports its 75 (a `kill` of it alone) as 1.
    assert launch.run([sys.executable, "-c", recorded_75_then_failed], agent=False) == 75


def test_the_first_status_recorded_stands(tmp_path, monkeypatch):
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path / "status"))
    assert record_exit_status(2, "error: a")
    assert not record_exit_status(2, "error: a")  # the same line from another process: not again
    assert record_exit_status(2, "error: b") and record_exit_status(EXIT_PREEMPTED)
    assert read_exit_status(str(tmp_path / "status")) == 2 and user_error_recorded()


def test_a_status_is_recorded_without_hard_links_and_not_at_all_where_it_cannot_be(
    tmp_path, monkeypatch
):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")  # as on some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path / "status"))
    assert record_exit_status(2, "error: a") and not record_exit_status(2, "error: a")
    assert read_exit_status(str(tmp_path / "status")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["status"]  # no temporary file left
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path / "gone" / "status"))
    assert record_exit_status(2, "error: a")  # the line is printed all the same


def test_a_sigterm_between_recording_a_line_and_printing_it_waits_for_the_print():
    taken = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: taken.append(signum))
    try:
        with sigterm_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert taken == []
        assert taken == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_same_bad_input_met_by_every_process_is_printed_once(tmp_path, monkeypatch, capsys):
    def bad_input():
        raise UserError("unknown config key x")

    def two_processes_meet_it() -> str:
        for _process in range(2):
            with pytest.raises(SystemExit) as ended:
                cli_main(bad_input)()
            assert ended.value.code == 2
        return capsys.readouterr().err

    monkeypatch.delenv(EXIT_STATUS_ENV, raising=False)
    assert two_processes_meet_it() == "error: unknown config key x\n" * 2  # each on its own
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path / "status"))
    assert two_processes_meet_it() == "error: unknown config key x\n"  # one launch


def test_after_a_peers_bad_input_its_failed_collective_is_one_line_and_a_bug_keeps_its_traceback(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(EXIT_STATUS_ENV, str(tmp_path / "status"))
    monkeypatch.setenv("RANK", "0")
    record_exit_status(2)  # by the peer, which printed its line

    def collective():
        raise RuntimeError("[gloo] Connection closed by peer")

    with pytest.raises(SystemExit) as ended:
        cli_main(collective)()
    assert ended.value.code == 1
    assert capsys.readouterr().err == (
        "error: process 0 stopped after another process's error above "
        "(RuntimeError: [gloo] Connection closed by peer)\n"
    )
    with pytest.raises(TypeError):
        cli_main(lambda: None + 1)()


def assert_stopped_with_a_checkpoint(code: int, output: str, seconds: float, run) -> None:
    assert code == 75, output
    assert seconds > GRACE_S + 5  # the checkpoint outlasted the agent's grace
    assert "Traceback" not in output and "stopped on request" in output, output
    assert [p for p in (run / "checkpoints").glob("step_*") if (p / "COMPLETE").is_file()], output


@pytest.mark.slow
def test_a_sigterm_to_a_two_process_launch_checkpoints_even_when_it_outlasts_the_grace(
    tiny_dir, tmp_path
):
    """`make train` with 2 processes goes through torchrun's agent (--multi_gpu), as a GPU run
    does. Its own SIGTERM handling prints a traceback and SIGKILLs the workers a grace period
    later (30 s by default); the launcher's relay must let a longer checkpoint finish: status
    75, no traceback. The grace is cut to 3 s here (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, which the
    agent reads through accelerate: a SIGTERM sent to the agent itself then ended a run 4.9 s
    later, its 12 s checkpoint unwritten, 2026-12-07), so that the test does not sleep 35 s."""
    out = tmp_path / "out"
    args = [*TWO_PROCESS_RUN, f"data_dir={tiny_dir}", f"out_dir={out}", "train_splits=[train]"]
    run = out / "demo_resnet18"
    stopped = stop_two_process_launch(tmp_path, args, lambda proc: proc.send_signal(signal.SIGTERM))
    assert_stopped_with_a_checkpoint(*stopped, run)
    # Rerun: it resumes mid-epoch and ends as an uninterrupted two-process run ends, the
    # resumed epoch's training loss included (the checkpoint holds the sums of both processes).
    two = ["-m", "train.launch", "--num_processes", "2"]
    assert "resumed from" in run_command(*two, *args).stdout
    run_command(*two, *[arg.replace(str(out), str(tmp_path / "whole")) for arg in args])
    resumed, whole = (
        pd.read_csv(folder / "demo_resnet18" / "metrics.csv").drop(columns="img_per_s")
        for folder in (out, tmp_path / "whole")
    )
    pd.testing.assert_frame_equal(resumed, whole, check_exact=False, rtol=1e-9)
    last = "checkpoints/step_000000020/student.safetensors"
    assert (run / last).read_bytes() == (tmp_path / "whole" / "demo_resnet18" / last).read_bytes()


@pytest.mark.slow
def test_stops_sent_to_every_process_of_a_launch_as_slurm_sends_them_checkpoint(tiny_dir, tmp_path):
    """SLURM signals every process of a job step: srun forwards the job's early-warning SIGUSR1
    to the whole cgroup, and the time limit, scancel or a preemption send SIGTERM there.
    torchrun's agent among them died of SIGUSR1 (its default action), leaving the workers to
    the step's SIGKILL, and SIGKILLed them a grace after a SIGTERM; it ignores both now (the
    launcher relays them). Both come here, 1 s apart, in a checkpoint that outlasts the grace."""
    out = tmp_path / "out"
    args = [*TWO_PROCESS_RUN, f"data_dir={tiny_dir}", f"out_dir={out}"]

    def to_every_process(proc):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            kill_tree(proc.pid, sig)
            time.sleep(1)

    stopped = stop_two_process_launch(tmp_path, args, to_every_process)
    assert_stopped_with_a_checkpoint(*stopped, out / "demo_resnet18")


STOP_RANK_0_IN_EVALUATION = """
import os, signal
import train.run as run

_predict = run.predict_crops_of


def predict(*args, **kwargs):  # the stop reaches process 0 alone, as its held-out pass starts
    if os.environ.get("RANK") == "0" and not os.environ.get("STOPPED"):
        os.environ["STOPPED"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return _predict(*args, **kwargs)


run.predict_crops_of = predict
"""


@pytest.mark.slow
def test_a_stop_to_one_process_during_a_two_process_evaluation_ends_it_on_both(tiny_dir, tmp_path):
    """Process 0 leaves its held-out pass after one batch, process 1 ends its own: they agree
    at its end (no collective left unmatched), save the unfinished epoch, and the rerun ends it."""
    out = tmp_path / "out"
    args = [*TWO_PROCESS_RUN, f"data_dir={tiny_dir}", f"out_dir={out}", "train_splits=[train]"]
    args.append("epochs=1")  # the stop comes in epoch 1's evaluation: the rerun only ends it
    proc = two_process_launch_with(tmp_path, STOP_RANK_0_IN_EVALUATION, args)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "stopped on request; checkpoint at step 10" in proc.stdout
    run = out / "demo_resnet18"
    state = torch.load(run / "checkpoints" / "step_000000010" / "state.pt", weights_only=True)
    assert state["position"] == [0, 10, 10] and state["history"] == []
    rerun = run_command("-m", "train.launch", "--num_processes", "2", *args)
    assert "resumed from" in rerun.stdout
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1]

"""make train's launcher settings and the SLURM job it can generate."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.conftest import run_command
from train.launch import launch_args


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_a_cpu_machine_gets_one_process_with_every_core_by_default(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    args = launch_args(None, None, gpus=0)
    assert option(args, "--num_processes") == "1" and args[1].endswith("cpu.yaml")
    assert option(args, "--num_cpu_threads_per_process") == "8"


def test_several_cpu_processes_are_launched_as_multi_gpu_so_that_they_really_start(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
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


def test_a_users_cpu_config_with_several_processes_is_corrected(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("distributed_type: 'NO'\nuse_cpu: true\nnum_processes: 2\n")
    assert "--multi_gpu" in launch_args(str(user), None, gpus=0)
    assert "--multi_gpu" not in launch_args(str(user), None, gpus=8)


def test_gpus_are_all_used():
    args = launch_args(None, None, gpus=4)
    assert args[1].endswith("gpu.yaml") and option(args, "--num_processes") == "4"
    assert "--num_cpu_threads_per_process" not in args


def test_the_generated_slurm_job_is_valid_shell_that_requeues_on_the_early_signal(tmp_path):
    job = run_command("-m", "train.slurm", "effnet_b7", "epochs=460", "--nodes", "4").stdout
    path = tmp_path / "job.sh"
    path.write_text(job)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --signal=B:USR1@" in job and "#SBATCH --requeue" in job
    assert "scontrol requeue" in job and "--num_processes $(( 4 * 8 ))" in job
    assert "-m train.launch" in job and "effnet_b7 epochs=460" in job

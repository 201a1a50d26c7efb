"""make train's launcher settings and the SLURM job it can generate."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import run_command
from train.launch import launch_args


def test_a_cpu_machine_gets_one_process_by_default():
    args = launch_args(None, None, gpus=0)
    assert args[-2:] == ["--num_processes", "1"] and args[1].endswith("cpu.yaml")


def test_several_cpu_processes_are_launched_as_multi_gpu_so_that_they_really_start():
    args = launch_args(None, 2, gpus=0)
    config = yaml.safe_load(open(args[1]))
    assert config["distributed_type"] == "MULTI_GPU" and args[-1] == "2"


def test_a_users_cpu_config_with_several_processes_is_corrected(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("distributed_type: 'NO'\nuse_cpu: true\nnum_processes: 2\n")
    assert "--multi_gpu" in launch_args(str(user), None, gpus=0)
    assert "--multi_gpu" not in launch_args(str(user), None, gpus=8)


def test_gpus_are_all_used():
    args = launch_args(None, None, gpus=4)
    assert args[1].endswith("gpu.yaml") and args[-1] == "4"


def test_the_generated_slurm_job_is_valid_shell_that_requeues_on_the_early_signal(tmp_path):
    job = run_command("-m", "train.slurm", "effnet_b7", "epochs=460", "--nodes", "4").stdout
    path = tmp_path / "job.sh"
    path.write_text(job)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --signal=B:USR1@" in job and "#SBATCH --requeue" in job
    assert "scontrol requeue" in job and "--num_processes $(( 4 * 8 ))" in job
    assert "-m train.launch" in job and "effnet_b7 epochs=460" in job

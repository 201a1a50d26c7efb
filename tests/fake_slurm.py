"""A fake SLURM for tests: `sbatch` records jobs, `Scheduler` runs them as SLURM would.

`install(bin_dir, state_dir)` puts `sbatch`, `squeue`, `scontrol`, `srun` and `scancel` on a
PATH; each is this file (FAKE_SBATCH_REFUSES=<n>: the n-th submission is refused). Jobs are JSON
files in the state folder. `Scheduler.run()` starts, one at a time, each pending job whose
`afterok` dependencies have completed, the way a batch host does: the script under bash in its
submit folder, with SLURM_JOB_ID, SLURM_SUBMIT_DIR, SLURM_JOB_NODELIST, SLURM_NODEID and
SLURM_RESTART_COUNT set and its output appended to its `--output` file. A job that ran
`scontrol requeue` goes back to pending when its script exits; a job whose dependency failed is
cancelled (`--kill-on-invalid-dep=yes`). A `preempt` hook may send the batch shell SIGUSR1, as
`--signal=B:USR1@<s>` does.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS = ("sbatch", "squeue", "scontrol", "srun", "scancel")


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the fake commands into `bin_dir`; the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{__file__}" {name} "$@"\n')
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}


def _jobs_dir(state_dir: str | None = None) -> Path:
    return Path(state_dir or os.environ["FAKE_SLURM_DIR"]) / "jobs"


def directives(script: str) -> dict[str, str]:
    """A batch script's #SBATCH options, by name."""
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):  # words as sbatch reads them: the shell's quotes
            for word in shlex.split(line[len("#SBATCH") :]):
                key, _, value = word[2:].partition("=")
                found[key] = value
    return found


def sbatch(args: list[str]) -> int:
    options = dict(a[2:].partition("=")[::2] for a in args if a.startswith("--"))
    script = Path([a for a in args if not a.startswith("--")][0]).resolve()
    job_id = str(len(list(_jobs_dir().glob("*.json"))) + 1)
    if job_id == os.environ.get("FAKE_SBATCH_REFUSES"):  # a cluster that refuses this one
        print("sbatch: error: QOSMaxSubmitJobPerUserLimit", file=sys.stderr)
        return 1
    dependency = options.get("dependency", "")
    options_in_script = directives(script.read_text())
    job = {
        "id": job_id,
        "name": options_in_script.get("job-name", script.name),
        "script": str(script),
        "output": options_in_script.get("output", f"slurm-{job_id}.out").replace("%j", job_id),
        "after": dependency.removeprefix("afterok:").split(":") if dependency else [],
        "kill_on_invalid_dep": options.get("kill-on-invalid-dep") == "yes",
        "submit_dir": os.getcwd(),
        "state": "PENDING",
        "restarts": 0,
    }
    (_jobs_dir() / f"{job_id}.json").write_text(json.dumps(job))
    print(job_id if "parsable" in options else f"Submitted batch job {job_id}")
    return 0


def squeue(args: list[str]) -> int:
    print("JOBID NAME STATE DEPENDENCY")
    for job in load_jobs().values():
        if job["state"] in ("PENDING", "RUNNING"):
            after = ":".join(job["after"])
            print(f"{job['id']} {job['name']} {job['state']} {'afterok:' + after if after else ''}")
    return 0


def scontrol(args: list[str]) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("localhost")
        return 0
    if args[0] == "requeue":
        (_jobs_dir() / f"{args[1]}.requeue").touch()
        return 0
    print(f"fake scontrol: unsupported {args}", file=sys.stderr)
    return 1


def srun(args: list[str]) -> int:
    while args[0].startswith("--"):  # srun's own options (--kill-on-bad-exit=1)
        args = args[1:]
    os.execvp(args[0], args)  # keeps the pid: the batch shell signals srun's pid


def scancel(args: list[str]) -> int:
    for job_id in args:
        path = _jobs_dir() / f"{job_id}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "state": "CANCELLED"}))
    return 0


def load_jobs(state_dir: str | None = None) -> dict[str, dict]:
    jobs = (json.loads(p.read_text()) for p in _jobs_dir(state_dir).glob("*.json"))
    return {job["id"]: job for job in sorted(jobs, key=lambda j: int(j["id"]))}


class Scheduler:
    """Runs the recorded jobs; `events` lists (what, job id, job name) in the order they happen.

    Of the jobs that may start, the newest starts first: a missing dependency then shows as a
    job that runs before the job it needs.
    """

    def __init__(self, env: dict[str, str], preempt: Callable[[dict], bool] | None = None):
        self.env = {**os.environ, **env}
        self.state_dir = env["FAKE_SLURM_DIR"]
        self.preempt = preempt
        self.events: list[tuple[str, str, str]] = []

    def _save(self, job: dict) -> None:
        (_jobs_dir(self.state_dir) / f"{job['id']}.json").write_text(json.dumps(job))

    def run(self, timeout_s: float = 1800) -> dict[str, dict]:
        """Run jobs until none is pending; every job's final record."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            jobs = load_jobs(self.state_dir)
            pending = [j for j in jobs.values() if j["state"] == "PENDING"]
            if not pending:
                return jobs
            ready = [j for j in pending if all(jobs[d]["state"] == "COMPLETED" for d in j["after"])]
            if ready:
                self._execute(ready[-1])
                continue
            doomed = [j for j in pending if j["kill_on_invalid_dep"]]
            if not doomed:
                raise RuntimeError(f"jobs wait for nothing that can complete: {pending}")
            for job in doomed:  # what waits on a failed job is cancelled
                job["state"] = "CANCELLED"
                self._save(job)
                self.events.append(("cancel", job["id"], job["name"]))
        raise TimeoutError("the fake SLURM queue did not drain")

    def _execute(self, job: dict) -> None:
        job_id = job["id"]
        env = {
            **self.env,
            "SLURM_JOB_ID": job_id,
            "SLURM_SUBMIT_DIR": job["submit_dir"],
            "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NODEID": "0",
            "SLURM_RESTART_COUNT": str(job["restarts"]),
        }
        output = Path(job["submit_dir"], job["output"])
        self.events.append(("start", job_id, job["name"]))
        with open(output, "a") as log:
            proc = subprocess.Popen(
                ["bash", job["script"]], cwd=job["submit_dir"], env=env, stdout=log, stderr=log
            )
            signalled = False
            while proc.poll() is None:
                if not signalled and self.preempt is not None and self.preempt(job):
                    proc.send_signal(signal.SIGUSR1)
                    signalled = True
                    self.events.append(("signal", job_id, job["name"]))
                time.sleep(0.05)
        requeue = _jobs_dir(self.state_dir) / f"{job_id}.requeue"
        if requeue.exists():
            requeue.unlink()
            job.update(state="PENDING", restarts=job["restarts"] + 1)
            self.events.append(("requeue", job_id, job["name"]))
        else:
            job["state"] = "COMPLETED" if proc.returncode == 0 else "FAILED"
            self.events.append(("end", job_id, job["name"]))
        job["exit_code"] = proc.returncode
        self._save(job)


if __name__ == "__main__":
    sys.exit(globals()[sys.argv[1]](sys.argv[2:]))

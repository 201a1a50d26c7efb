"""`make bench`: every benchmark of the pipeline, one after another, each printing its ratios.

Each runs in its own process, as it does alone: some pin torch's threads (the loss and loader
benchmarks measure one core) and the ensemble's reports its peak memory, neither of which may
leak into the next. The data benchmark (150,000 files) runs apart: `make bench-data`.
"""

from __future__ import annotations

import subprocess
import sys

BENCHES = {  # name: its arguments (every lever the speed work tried, side by side)
    "losses": [],
    "loader": [],
    "train": ["--compile"],
    "loop": ["--workers", "0", "1", "2"],
    "tencrop": [],
    "ensemble": [],
}


def main() -> None:
    for name, args in BENCHES.items():
        command = ["-m", f"scripts.bench.{name}", *args]
        print(f"\n#### python {' '.join(command)}", flush=True)
        status = subprocess.run([sys.executable, *command]).returncode
        if status != 0:
            raise SystemExit(f"make bench: python {' '.join(command)} failed (status {status})")


if __name__ == "__main__":
    main()

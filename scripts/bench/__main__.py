"""`make bench`: every benchmark of the pipeline, one after another, each printing its ratios.

The data benchmark (150,000 files) runs apart: `make bench-data`.
"""

from __future__ import annotations

import importlib

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
        print(f"\n#### python -m scripts.bench.{name} {' '.join(args)}", flush=True)
        importlib.import_module(f"scripts.bench.{name}").main(args)


if __name__ == "__main__":
    main()

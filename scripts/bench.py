"""`make bench`: every benchmark of the pipeline, one after another, each printing its ratios.

The data benchmark (150,000 files) runs apart: `make bench-data`.
"""

from __future__ import annotations

import importlib

BENCHES = (
    "bench_losses",
    "bench_loader",
    "bench_train",
    "bench_loop",
    "bench_tencrop",
    "bench_ensemble",
)


def main() -> None:
    for name in BENCHES:
        print(f"\n#### scripts/{name}.py", flush=True)
        importlib.import_module(f"scripts.{name}").main([])


if __name__ == "__main__":
    main()

"""Benchmarks: the losses, the loader, the bare step, the real loop, TenCrop, the ensemble, data
placement (`make bench`, `make bench-data`), and the GPU check (`make gpu-check`). Each prints its
ratios measured side by side in one run; none is a test.

May import the stages, `scripts.stages` and `scripts.ops.plan` (whose estimates the GPU check
measures); never `scripts.studies`.
"""

"""`python -m scripts.bench.data`: the benchmark's entry point runs and reports both modes."""

from __future__ import annotations

import re

from tests.conftest import run_command


def test_the_benchmark_reports_link_and_copy_rates_on_a_small_tree(tmp_path):
    proc = run_command("-m", "scripts.bench.data", "--files", "300", "--tmp", str(tmp_path))
    assert "bench-data: 300 files" in proc.stdout
    rates = {
        m: float(r) for m, r in re.findall(r"(link|copy)\s+[\d.]+ s\s+(\d+) files/s", proc.stdout)
    }
    assert set(rates) == {"link", "copy"} and min(rates.values()) > 0
    assert re.search(r"link is [\d.]+x faster than copy", proc.stdout)
    assert list(tmp_path.iterdir()) == []  # the synthetic tree is removed

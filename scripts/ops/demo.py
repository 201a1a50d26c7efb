"""`make demo`: the whole pipeline on the embedded benchmark, from a fresh clone, on the CPU.

data (fashion50) -> train each model of configs/ensembles/demo.yaml (accelerate launch) ->
TenCrop logits -> ensemble -> submissions/demo.csv -> evaluation against the local test labels
-> a closing table. Every stage is the real command; a rerun reuses what is done (training
resumes or finds its run complete, logits newer than their checkpoint are kept).

`python -m scripts.ops.demo [key=value ...]` passes overrides to every model (the tests run the same
script on a tiny dataset with `epochs=1 data_dir=... out_dir=... logits_dir=...`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.errors import cli_main
from common.fs import write_text_atomic
from data_prep.layout import Layout
from ensemble.blend import load_ensemble_config
from ensemble.evaluate import logits_top1, score
from scripts.stages import logits_current, run_module
from train.config import load_config, logits_dir, run_dir

ENSEMBLE = "demo"


class Stages:
    """Runs the demo's commands and remembers where the minutes went; with `timings`, writes
    them there as JSON after each stage, so that a demo cut short (make gpu-check's time
    budget) still tells the stages it finished."""

    def __init__(self, timings: Path | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.timings = timings

    def run(self, title: str, *args: str) -> None:
        print(f"\n==> {title}: python -m {' '.join(args)}", flush=True)
        started = time.time()
        run_module(*args, then="rerun make demo")
        self.done(title, time.time() - started)
        print(f"    ({self.seconds[title]:.0f} s)", flush=True)

    def kept(self, title: str, why: str) -> None:
        print(f"\n==> {title}: {why}, kept")
        self.done(title, 0.0)

    def done(self, title: str, seconds: float) -> None:
        self.seconds[title] = seconds
        if self.timings is not None:
            write_text_atomic(self.timings, json.dumps(self.seconds, indent=1))

    def table(self) -> str:
        total = sum(self.seconds.values())
        lines = [f"{'stage':<34}{'seconds':>8}{'share':>8}"]
        for title, seconds in self.seconds.items():
            lines.append(f"{title:<34}{seconds:>8.0f}{100 * seconds / total:>7.0f}%")
        lines.append(f"{'total':<34}{total:>8.0f}   ({total / 60:.1f} min)")
        return "\n".join(lines)


def closing_table(configs: list[dict], submission: Path, ensemble: dict, labels: Path) -> str:
    seen = any("val" in cfg["train_splits"] for cfg in configs)
    val_header = "val (trained on)" if seen else "val top-1"
    lines = [f"{'model':<22}{val_header:>17}{'test top-1':>12}   artifacts"]
    for cfg in configs:
        meta = json.loads((logits_dir(cfg) / "meta.json").read_text())
        test = logits_top1(logits_dir(cfg), labels)
        lines.append(
            f"{cfg['name']:<22}{meta['scores']['val']['top1']:>16.2f}%{test:>11.2f}%   "
            f"{run_dir(cfg)}/, "
            f"{logits_dir(cfg)}/"
        )
    lines.append(
        f"{'ensemble':<22}{ensemble['val']:>16.2f}%{ensemble['test']:>11.2f}%   "
        f"{submission}, {submission.with_suffix('.zip')}, {submission.with_suffix('.json')}"
    )
    if seen:
        lines.append("(val top-1: these models trained on train+val, so it is not held out)")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value for every model")
    parser.add_argument("--submissions", type=Path, default=Path("submissions"))
    parser.add_argument(
        "--started", type=float, help="epoch seconds when `make demo` began (times its setup)"
    )
    parser.add_argument(
        "--timings",
        type=Path,
        help="also write the stages' seconds here, as JSON, after each (make gpu-check)",
    )
    args = parser.parse_args(argv)
    stages = Stages(args.timings)
    if args.started is not None:
        stages.done("setup (make setup)", time.time() - args.started)
    models = load_ensemble_config(ENSEMBLE)["models"]
    configs = [load_config(model, args.overrides) for model in models]
    data = Path(configs[0]["data_dir"])
    if Layout(data).manifest.is_file():
        stages.kept("data", f"{data} is complete")
    else:
        stages.run("data", "data_prep", "fashion", "--out", str(data))
    for model in models:
        stages.run(f"train {model}", "train.launch", model, *args.overrides)
    for model, cfg in zip(models, configs, strict=True):
        if logits_current(cfg):
            stages.kept(f"TenCrop logits {model}", "up to date")
        else:
            stages.run(f"TenCrop logits {model}", "ensemble.logits", model, *args.overrides)
    stages.run(
        "ensemble",
        "ensemble.blend",
        "--config",
        ENSEMBLE,
        "--name",
        ENSEMBLE,
        "--logits-dir",
        configs[0]["logits_dir"],
        "--out-dir",
        str(args.submissions),
    )
    submission = args.submissions / f"{ENSEMBLE}.csv"
    labels = Layout(data).test_labels
    stages.run("evaluate", "ensemble.evaluate", str(submission), "--labels", str(labels))
    report = json.loads(submission.with_suffix(".json").read_text())
    correct, total = score(submission, labels, len(Layout(data).classes()))
    scores = {"val": report["val"]["top1"]["ensemble"], "test": 100.0 * correct / total}
    print("\n" + closing_table(configs, submission, scores, labels))
    print("\nWhere the minutes went:\n" + stages.table())


if __name__ == "__main__":
    main()

"""`python -m train MODEL [key=value ...]`: one training run, under `accelerate launch` or alone."""

from __future__ import annotations

import argparse
import sys

from common.errors import cli_main
from common.status import status_for_agent
from train.config import available, load_config
from train.stop import StopRequest


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train one backbone under the Attract-and-Repulse recipe; a rerun resumes.",
        epilog=f"models: {', '.join(available('models'))}",
    )
    parser.add_argument("model", help="a name in configs/models/ or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value settings (see configs/base.yaml)")
    args = parser.parse_args(argv)
    cfg = load_config(args.model, args.overrides)
    # Stop signals are the process's from here (train/stop.py), before torch is imported:
    # train.launch relays a stop as soon as this process catches it.
    with StopRequest(cfg["stop_timeout_s"]):
        # After the config is valid: a typo fails fast, before torch is imported.
        from train.auto_batch import train_auto_batch
        from train.run import fixed_batch, train

        return train(cfg, train_auto_batch if cfg["batch_size"] == "auto" else fixed_batch)


if __name__ == "__main__":
    sys.exit(status_for_agent(main()))

"""`batch_size: auto`: the recipe's global batch, with the largest micro-batch that fits the GPU.

The global batch is `lr_base_batch` (512: the paper's 8 GPUs x 64, the batch its lr is given
for), so the lr is the recipe's whatever fits. The first micro-batch tried is lr_base_batch /
(processes x grad_accum); an out-of-memory error before the first optimiser step is complete
halves it and doubles grad_accum, so that micro-batch x processes x grad_accum stays the global
batch, until a step fits (Accelerate's `find_executable_batch_size`, with halving, restricted to
the first step: a later out-of-memory error is not one a smaller first step would have revealed,
and is raised). Every process of a run sees the same shapes, so all of them fail at the same step.
The choice is printed and saved in the run's config.yaml; a resumed run takes it from there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from common.errors import UserError
from common.status import EXIT_PREEMPTED
from common.yamlio import load_yaml
from train import checkpoint as ckpt
from train.config import run_dir
from train.run import Run, run_to_end
from train.views import SharedMixup


def pairs(cfg: dict[str, Any]) -> int:
    """2 when Mixup/CutMix are on (they mix images in pairs: micro-batches must be even)."""
    return 2 if SharedMixup.from_config(cfg).enabled else 1


def first_choice(cfg: dict[str, Any], world: int) -> tuple[int, int]:
    """(micro-batch, grad_accum) of the first attempt: lr_base_batch on `world` processes."""
    micro, rest = divmod(cfg["lr_base_batch"], world * cfg["grad_accum"])
    if rest or micro < 1 or micro % pairs(cfg):
        raise UserError(
            f"batch_size=auto: lr_base_batch={cfg['lr_base_batch']} does not split into "
            f"{world} processes x grad_accum={cfg['grad_accum']} even micro-batches; set "
            "batch_size to a number"
        )
    return micro, cfg["grad_accum"]


def halved(micro: int, accum: int, multiple: int) -> tuple[int, int]:
    """Half the micro-batch, twice the accumulation; refused below a `multiple` of images."""
    if micro % (2 * multiple):
        raise UserError(
            f"batch_size=auto: a micro-batch of {micro} does not fit and cannot be halved "
            "keeping the global batch (Mixup/CutMix need even batches); use a GPU with more "
            "memory or a smaller img_size"
        )
    return micro // 2, accum * 2


def saved_choice(cfg: dict[str, Any]) -> dict[str, int] | None:
    """The micro-batch and grad_accum of a run that has a checkpoint to resume from."""
    folder = run_dir(cfg)
    saved = Path(folder) / "config.yaml"
    if not ckpt.has_checkpoint(folder) or not saved.is_file():
        return None
    resolved = load_yaml(saved.read_text())
    return {key: resolved[key] for key in ("batch_size", "grad_accum")}


def describe(micro: int, accum: int, world: int) -> str:
    return (
        f"micro-batch {micro} x {world} processes x grad_accum {accum} = global batch "
        f"{micro * world * accum}"
    )


def train_auto_batch(cfg: dict[str, Any]) -> int:
    """Train (or resume) a `batch_size: auto` run; returns the process exit code."""
    saved = saved_choice(cfg)
    if saved is not None:
        return run_to_end(Run({**cfg, **saved}))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = first_choice(cfg, world)
    while True:
        run = Run({**cfg, "batch_size": micro, "grad_accum": accum})
        run.acc.print(f"batch_size=auto: trying {describe(micro, accum, world)}")
        try:
            return run_to_end(run)
        except RuntimeError as err:
            if run.global_step > 0 or not should_reduce_batch_size(err):
                raise
        if run.stop.requested:  # a stop came during the failed step: nothing trained to save
            run.acc.print("batch_size=auto: stopped on request before a micro-batch fitted")
            return EXIT_PREEMPTED
        if cfg["compile"] == "reduce-overhead":
            # Halving needs accumulation, which CUDA graphs refuse (train/distributed.py).
            raise UserError(
                f"batch_size=auto: micro-batch {micro} ran out of memory, and a smaller one needs "
                "grad_accum, which compile=reduce-overhead refuses; use compile=true or a "
                "smaller img_size"
            )
        run.acc.print(f"batch_size=auto: out of memory at micro-batch {micro}; halving it")
        micro, accum = halved(micro, accum, pairs(cfg))
        run.acc.free_memory()
        del run
        if cfg["compile"]:  # dynamo's graphs of the failed size would keep its memory held
            torch.compiler.reset()
        clear_device_cache(garbage_collection=True)

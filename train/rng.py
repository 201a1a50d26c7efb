"""Every random number of a run, and why a resumed run draws exactly the same ones.

Two kinds of randomness, kept apart on purpose:

Keyed streams (pure functions of their keys; nothing to save or restore):
- training order of epoch e:           `generator_for(seed, "order", e)`
- held-out images of class c:          `generator_for(seed, "holdout", c)`
- augmentation of image i in epoch e:  `stable_seed(seed, e, i, rank)`, applied to Python's,
  numpy's and torch's global RNGs around the transform (`seeded_global_rngs`)
- Mixup/CutMix of micro-step s:        `mix_generator(seed, e, s, rank)`
A resumed run recomputes each of these from its position (epoch, micro-step), whichever process
or DataLoader worker does the work. Keys are hashed with blake2b (`stable_seed`), never with
Python's per-process salted `hash`.

Stateful streams (the global generators that dropout, stochastic depth and weight init draw
from): seeded once per run by `seed_everything`, then carried in every checkpoint
(`rng_state`, one file per process) and restored on resume (`set_rng_state`). With both, a run
killed at any step boundary and resumed ends bit-identical to an uninterrupted one (on the CPU
at the same thread count; float rounding aside, anywhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def stable_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on `keys` (not on Python's per-process salted `hash`)."""
    canonical = [k if isinstance(k, str) else operator.index(k) for k in keys]
    digest = hashlib.blake2b(json.dumps(canonical).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_for(*keys: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded by `stable_seed(*keys)`."""
    return torch.Generator().manual_seed(stable_seed(*keys))


def mix_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """Mixing randomness of one micro-step: a function of (seed, epoch, step, rank)."""
    return generator_for(seed, "mix", epoch, step, rank)


def _seed_python_numpy(seed: int) -> None:
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs (CUDA's too) at the start of a run, so
    that two runs with the same seed start, and save, the same RNG states."""
    _seed_python_numpy(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's `random`, numpy's and torch's CPU global RNGs; restore all three on exit.

    timm's crop and AutoAugment draw from `random` (RandAugment from numpy), torchvision's flip
    and RandomErasing's noise from torch. Restoring keeps the dataset from disturbing the training
    RNG when it runs in the main process (workers=0). CUDA generators are never touched.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _seed_python_numpy(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():  # this process's GPU only: a resume may see fewer of them
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

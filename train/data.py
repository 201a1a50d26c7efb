"""What a run trains and evaluates on, and in which order: resumable, seeded, sharded.

The training order is a seeded permutation per epoch, cut into global batches of
`batch_size x world` images; process r takes the r-th slice of each. A run resumed at
(epoch, step) replays exactly the batches it had not yet seen, so a resumed run matches an
uninterrupted one. Augmentation randomness lives in the dataset (per image, from seed, epoch,
index and rank), so workers and restarts do not change it.
"""

from __future__ import annotations

import atexit
import multiprocessing
import shutil
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from common.errors import UserError
from data_prep.layout import Layout
from train.distributed import cpus_per_process, shard
from train.inference import build_crop_transform
from train.rng import generator_for
from train.views import EvalDataset, MultiViewDataset, WorkerViews, build_train_transform

Item = tuple[str, Path, int]


def split_train_eval(cfg: dict[str, Any]) -> tuple[list[Item], list[Item]]:
    """Training items of `train_splits`, and the items that validate the run.

    Trained on `train` alone, a run validates on `val`. Trained on train+val (the final models),
    it holds out `holdout_per_class` images per class for monitoring, as the paper does, drawn
    with `holdout_seed` (not the model's seed): every ensemble member holds out the same images.
    """
    layout = Layout(Path(cfg["data_dir"]))
    splits = cfg["train_splits"]
    unknown = set(splits) - {"train", "val"}
    if unknown or not splits or len(set(splits)) != len(splits):  # [train, train]: twice the data
        raise UserError(f"train_splits={splits}: use [train] or [train, val]")
    train = [item for split in splits for item in layout.split_items(split)]
    if "val" not in cfg["train_splits"]:
        return train, layout.split_items("val")
    holdout = cfg["holdout_per_class"]
    by_class: dict[int, list[Item]] = defaultdict(list)
    for item in train:
        by_class[item[2]].append(item)
    fewest = min(by_class.values(), key=len)
    if len(fewest) <= holdout:  # a class the model would never see
        name = layout.classes()[fewest[0][2]]
        raise UserError(
            f"holdout_per_class={holdout} holds out all {len(fewest)} train+val images of class "
            f"{name!r} in {layout.root}; lower holdout_per_class below {len(fewest)}"
        )
    keep, held = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = torch.randperm(
            len(items), generator=generator_for(cfg["holdout_seed"], "holdout", label)
        )
        chosen = set(order[:holdout].tolist())
        for i, item in enumerate(items):
            (held if i in chosen else keep).append(item)
    return keep, held


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1/SIGINT to the training process, which checkpoints:
    a launcher or SLURM signals the whole process group, and a worker killed by it would
    crash the step instead. Such workers outlive a SIGTERM, so the training process kills them
    with SIGKILL when it exits (`_kill_workers_at_exit`)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # a terminal's Ctrl-C too
        signal.signal(sig, signal.SIG_IGN)
    # Fork copied the training process's wake-up pipe (train/stop.py): a worker's own signals
    # must not reach the training process's stop watchdog through it.
    signal.set_wakeup_fd(-1)


def kill_loader_workers() -> None:
    """SIGKILL this process's DataLoader workers: the children that ignore SIGTERM (they only
    read images), on which multiprocessing's exit handler would wait forever. Other children,
    a notebook's own processes beside an in-process `train()`, are left alone."""
    for child in multiprocessing.active_children():
        if ignores_sigterm(child.pid):
            child.kill()


def ignores_sigterm(pid: int | None) -> bool:
    """Whether process `pid` ignores SIGTERM (Linux: /proc's SigIgn mask); True where that
    cannot be read, as a worker may."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next(line for line in status if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return True
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


def _kill_workers_at_exit() -> None:
    """multiprocessing's own exit handler terminates (SIGTERM) and then joins every worker still
    alive; workers that ignore SIGTERM would make it wait forever. They are alive at exit when
    an error ended the run while a loader was being read (a worker's UserError, a failed step):
    the exception's traceback keeps the loader's iterator, which would shut them down, alive."""
    # torch's SIGCHLD handler would report the kill as a crashed worker (a traceback at exit).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    kill_loader_workers()


def _register_exit_handler() -> None:
    # atexit runs handlers last registered first: this one before multiprocessing's (registered
    # when torch imported it). Unregistering first keeps one registration however many loaders.
    atexit.unregister(_kill_workers_at_exit)
    atexit.register(_kill_workers_at_exit)


def worker_death(err: RuntimeError) -> UserError | None:
    """A DataLoader worker killed by the kernel (out of memory, most often; out of shared memory
    where it died of a bus error) as a UserError."""
    text = str(err).strip()
    if not text.startswith("DataLoader worker (pid"):
        return None
    cause = text.split(". ", 1)[0].rstrip(".")
    if cause.endswith("Bus error"):  # a write into a full /dev/shm, where workers hand batches
        try:
            held = f" (/dev/shm holds {shutil.disk_usage('/dev/shm').total / 2**20:.0f} MiB)"
        except OSError:
            held = ""
        return UserError(
            f"{cause}: a data loader process ran out of shared memory{held}; give it more (a "
            "container: docker run --shm-size=16g), or lower workers= or batch_size=, and "
            "rerun: the run resumes from its newest checkpoint"
        )
    return UserError(
        f"{cause}: a data loader process died, most often for lack of memory; lower workers= "
        "or batch_size= (or free memory) and rerun: the run resumes from its newest checkpoint"
    )


class EpochBatchSampler(Sampler[list[int]]):
    """This process's batches of one epoch, from `start_step` on (drop_last: fixed step count)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.steps = n // (batch_size * world)
        if self.steps == 0:
            raise UserError(
                f"{n} training images cannot fill one global batch of {batch_size} x {world} "
                "processes; lower batch_size (batch_size=auto fills lr_base_batch: give a number)"
            )
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=generator_for(self.seed, "order", self.epoch))
        per_step = self.batch_size * self.world
        for step in range(self.start_step, self.steps):
            first = step * per_step + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()


def loader_workers(cfg: dict[str, Any]) -> int:
    """`workers`, with `auto` resolved. On a GPU machine: the CPUs this process may use, shared
    with the node's other training processes (LOCAL_WORLD_SIZE), less one for the process
    itself. On a CPU machine: `cpu_workers`, the count measured on 2 cores (configs/base.yaml)."""
    if cfg["workers"] != "auto":
        return cfg["workers"]
    if not torch.cuda.is_available():
        return cfg["cpu_workers"]
    return max(1, cpus_per_process() - 1)


class DevicePrefetcher:
    """A loader's batches with their uint8 views already on `device` (timm's PrefetchLoader,
    nanoGPT's habit): batch k+1 is taken from the loader and its copy queued, from pinned
    memory on a side stream, as soon as batch k is handed out, so it travels while k trains.
    Labels, indices and the erasing draws stay on the host, where the step reads them.
    On the CPU it hands the batches out as they come."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                pixels = batch[0].pixels.to(self.device, non_blocking=True)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            # The memory was allocated on the side stream: keep it from reuse until the
            # compute stream is done with it.
            pixels.record_stream(torch.cuda.current_stream(self.device))
            pending = (batch[0]._replace(pixels=pixels), *batch[1:])
        if pending is not None:
            yield pending


def train_loader(
    cfg: dict[str, Any], items: list[Item], rank: int, world: int
) -> tuple[DataLoader, MultiViewDataset, EpochBatchSampler]:
    if cfg["num_views"] not in (1, 2):
        raise UserError(f"num_views={cfg['num_views']}: the recipe uses 1 or 2 views")
    # The workers ship uint8 views and erasing draws; the device finishes them (DeviceAugment).
    views = WorkerViews(build_train_transform(cfg))
    dataset = MultiViewDataset(items, views, cfg["num_views"], cfg["seed"], rank=rank)
    workers = loader_workers(cfg)
    sampler = EpochBatchSampler(len(items), cfg["batch_size"], cfg["seed"], rank, world)
    _register_exit_handler()
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        worker_init_fn=ignore_stop_signals,
        # Persistent: starting the pool again every epoch cost a tenth of an epoch on 2 cores
        # (scripts/bench/loop.py). The workers ignore SIGTERM; _kill_workers_at_exit ends them.
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        # A private generator: creating an epoch's iterator must not draw from the global RNG,
        # or a run resumed mid-epoch would shift the dropout stream of the uninterrupted run.
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    return loader, dataset, sampler


def eval_loader(
    cfg: dict[str, Any],
    items: list[Item],
    rank: int,
    world: int,
    batch_size: int,
    view: str = "center",
) -> DataLoader:
    """This process's shard of `items` (rank, rank + world, ...: every item on exactly one
    process) as batches of crop views: the centre (validation) or TenCrop (`make logits`)."""
    dataset = Subset(
        EvalDataset(items, build_crop_transform(cfg, view)), list(shard(len(items), rank, world))
    )
    _register_exit_handler()
    # No more workers than batches: every worker is started (and, not persistent, at every
    # pass), and on a GPU machine `auto` is ~15 of them against the few batches of a small
    # validation set, each evaluated twice (student, teacher) at every epoch.
    batches = -(-len(dataset) // batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=min(loader_workers(cfg), batches),
        worker_init_fn=ignore_stop_signals,
        pin_memory=torch.cuda.is_available(),
    )

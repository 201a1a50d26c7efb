"""Processes and devices: the one place that talks to Accelerate about them.

`make_accelerator` forces the CPU when CUDA is absent. Without that, `accelerate launch
--multi_gpu --num_processes 2` on a CPU machine starts two processes that each believe they are
alone and write the same checkpoints; with it they form one gloo group. A launcher/Accelerator
disagreement on the world size is refused rather than trained through.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin

from common.errors import UserError
from common.processes import available_cpus


def resolve_precision(mixed_precision: str) -> str:
    """`auto` = bf16 where the GPU computes it natively (Ampere and later), full precision
    elsewhere: bf16 on the CPU is slow, and torch's default check counts the emulated bf16 of
    a V100 or T4 as supported."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "no"


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below native bf16: under one of them bf16 is emulated,
# as on an AVX2-only CPU (setting AVX2 on an AVX-512 machine is how that CPU is emulated).
ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and oneDNN may use it.
    Without it bf16 is emulated: measured about 9x slower than fp32 (ResNet-50 at 224 px,
    micro-batch 2, train step: 3.97 s against 0.45 s; ONEDNN_MAX_CPU_ISA=AVX2, 2026-12-05)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ISAS_WITHOUT_BF16:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpus_per_process() -> int:
    """The CPUs this process may use (its affinity mask, within its cgroup's quota), shared
    with the node's other training processes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, available_cpus() // local)


def tune_for_gpu(workers: int) -> None:
    """On a GPU: cuDNN times its kernels once for the run's fixed shapes and keeps the fastest,
    and the training process takes only the cores its loader workers leave (torch would start
    one intra-op thread per core beside them). Nothing changes on the CPU."""
    if not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(max(1, cpus_per_process() - workers))


def dynamo_plugin(compile_model: bool | str, grad_accum: int = 1) -> TorchDynamoPlugin:
    """The config's `compile`: false = eager; true = torch.compile with inductor's default mode;
    "reduce-overhead" = inductor with CUDA graphs, each step's kernels replayed in one launch
    (inductor applies them to CUDA tensors only; refused with gradient accumulation)."""
    if not compile_model:
        return TorchDynamoPlugin(backend="no")
    if compile_model == "reduce-overhead" and grad_accum > 1:
        # The first micro-step's gradients live in the graph's memory and the next replay
        # writes over them (pytorch/pytorch#169545): accumulation would be wrong or fail.
        raise UserError(
            f"compile=reduce-overhead with grad_accum={grad_accum}: CUDA graphs overwrite the "
            "gradients a micro-step leaves for the next; use compile=true or grad_accum=1"
        )
    mode = "default" if compile_model is True else compile_model
    return TorchDynamoPlugin(backend="inductor", mode=mode)


def full_fp32() -> None:
    """`mixed_precision: no` on a GPU computes in IEEE fp32 (ours), as on the CPU: cuDNN's
    convolutions default to TF32 (10 of fp32's 23 mantissa bits) on Ampere and later, and
    Accelerate turns TF32 matmuls on under torch.compile. bf16 (`auto` on a GPU) is the fast
    path. The legacy flags: inductor reads them, and a read after the newer `fp32_precision`
    API has set them raises."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def make_accelerator(
    mixed_precision: str = "no",
    grad_accum: int = 1,
    compile_model: bool | str = False,
    log_with: list[str] | None = None,
    project_dir: Path | None = None,
    cpu: bool = False,
) -> Accelerator:
    """`compile_model` (`dynamo_plugin`): `prepare` wraps the student in torch.compile
    (`plain_module` unwraps it). `log_with` trackers (train/tracking.py) write under
    `project_dir`. `cpu`: the CPU even where a GPU is visible (the CPU benchmarks)."""
    accelerator = Accelerator(
        cpu=cpu or not torch.cuda.is_available(),
        mixed_precision=resolve_precision(mixed_precision),
        gradient_accumulation_steps=grad_accum,
        dynamo_plugin=dynamo_plugin(compile_model, grad_accum),
        log_with=log_with or None,
        project_dir=project_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"the launcher started WORLD_SIZE={launched} processes but the Accelerator sees "
            f"{accelerator.num_processes}; on a CPU machine launch with `--multi_gpu "
            "--num_processes N` (make train does), not `--cpu --num_processes N`"
        )
    if accelerator.mixed_precision == "no" and accelerator.device.type == "cuda":
        full_fp32()
    return accelerator


def plain_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module itself, without DDP's or torch.compile's wrapper: its state_dict has the keys
    an eager run's has. Accelerate keeps the compile wrapper by default, whose keys carry an
    `_orig_mod.` prefix: a compiled run's student checkpoint then loaded nowhere else."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def share_main_buffers(module: torch.nn.Module, world: int) -> None:
    """The main process's buffers (batch-norm statistics) in `module` on every process, one
    broadcast per dtype. DDP does this for the student at each forward; the teacher's EMA reads
    them after the step, when each process's student holds statistics of its own micro-batch:
    without this every process kept its own teacher, while checkpoints hold the main one's (a
    resume then changed the other processes' teacher, and the run)."""
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([buffer.reshape(-1) for buffer in buffers])
        torch.distributed.broadcast(flat, src=0)
        parts = flat.split([buffer.numel() for buffer in buffers])
        # One fused copy: a GPU step would otherwise launch one copy per buffer (hundreds at B7).
        torch._foreach_copy_(buffers, [p.view_as(b) for b, p in zip(buffers, parts, strict=True)])


def shard(n: int, rank: int, world: int) -> range:
    """Indices this process handles: rank, rank + world, ... (every index on exactly one rank)."""
    return range(rank, n, world)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on some process: one decision that every process takes alike."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device)) > 0)


def gather_rows(
    accelerator: Accelerator, index: torch.Tensor, values: torch.Tensor, total: int
) -> torch.Tensor:
    """Rows of all processes as one [total, ...] tensor ordered by global index, on every process.

    Shards may be uneven: each pads to the longest with index -1, and the padding is dropped
    after the gather, so every image counts exactly once (no duplicated rows at the end).
    """
    longest = -(-total // accelerator.num_processes)
    pad = longest - index.numel()
    index = torch.cat([index.long(), index.new_full((pad,), -1, dtype=torch.long)])
    values = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
    all_index = accelerator.gather(index.to(accelerator.device)).cpu()
    all_values = accelerator.gather(values.to(accelerator.device)).cpu()
    keep = all_index >= 0
    all_index, all_values = all_index[keep], all_values[keep]
    if all_index.numel() != total or not torch.equal(all_index.sort().values, torch.arange(total)):
        raise RuntimeError(f"gathered {all_index.numel()} rows for {total} indices: shards overlap")
    out = torch.empty_like(all_values)
    out[all_index] = all_values
    return out

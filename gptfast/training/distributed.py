"""Data-parallel training across processes with torch.distributed (launched by torchrun).

    torchrun --standalone --nproc_per_node=2 scripts/train.py --grad-accum 4 ...     # one machine
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 scripts/train.py ...

torchrun starts one process per device and tells each its place through environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). Each process holds a full copy of the model
wrapped in DistributedDataParallel, which averages the gradients across processes during
backward (NCCL between GPUs, Gloo between CPU processes).

How the work is split, so that N processes compute what one would:
- every process builds the same shuffled order of micro-batches (same seed); process r takes
  micro-batches r, r + N, r + 2N, ... (`gptfast.data.RankStridedBatches`);
- the global batch is --batch-size x --grad-accum windows per optimizer step whatever N is: each
  process accumulates grad_accum / N micro-batches (so N must divide --grad-accum);
- gradients are all-reduced once per optimizer step (`no_sync` on the other micro-batches);
- the reported loss is the mean over all processes; evaluation batches are split across the
  processes and their losses summed, so the figures equal a 1-process run's; rank 0 alone
  samples, logs and writes checkpoints.

With --fsdp the model is sharded instead of replicated (FSDP, `shard_fsdp`): each process keeps
1/N of the weights, gradients and optimizer state. Every forward then needs all processes, so
evaluation gives each the same number of batches and every process runs the epoch sample;
checkpoints gather the full state on rank 0 (`training_state`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0           # this process among all of them
    local_rank: int = 0     # this process on its machine: which GPU it drives
    world_size: int = 1     # processes in total
    fsdp: bool = False      # parameters, gradients and optimizer state sharded (FSDP) instead of replicated

    @property
    def is_main(self) -> bool:
        """The process that prints, logs, samples and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (a no-op for a plain `python scripts/train.py`).
    NCCL for CUDA devices, Gloo for CPU."""
    if not launched_by_torchrun():
        return SINGLE
    info = DistInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                    world_size=int(os.environ["WORLD_SIZE"]))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_accum(grad_accum: int, info: DistInfo) -> int:
    """Micro-batches each process accumulates so the global batch matches a 1-process run."""
    if grad_accum % info.world_size:
        raise ValueError(f"--grad-accum {grad_accum} must be a multiple of the number of processes "
                         f"({info.world_size}): the global batch is batch_size x grad_accum windows, "
                         "split evenly across processes")
    return grad_accum // info.world_size


def sum_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `value` over all processes (itself when alone)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `value` over all processes (itself when alone)."""
    return sum_over_ranks(value, info) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first(info: DistInfo):
    """Rank 0 runs the body first (e.g. downloads or tokenizes into a shared cache), the others
    after it finished - then find the cached result instead of racing to write it."""
    if not info.is_main:
        barrier(info)
    try:
        yield
    finally:
        if info.is_main:
            barrier(info)


def maybe_no_sync(model, sync: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on micro-batches that are not
    the last of a step."""
    if hasattr(model, "set_requires_gradient_sync"):             # FSDP2: a switch, not a context
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device):
    """`model` inside DistributedDataParallel (which first broadcasts rank 0's weights), or as is."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None)


def shard_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` in place with FSDP (fully_shard): each transformer block's parameters are
    gathered just before it runs and freed after, so a process holds 1/N of the weights,
    gradients and AdamW state plus one block at a time. The embeddings, final LayerNorm and LM
    head form the root group."""
    from torch.distributed.fsdp import fully_shard

    for block in model.trf_blocks:
        fully_shard(block)
    fully_shard(model)
    return model


# Optimizer states in checkpoints: "index" = torch's own optimizer.state_dict() (parameters
# numbered in optimizer order); "fqn" = torch.distributed.checkpoint's full state dict (parameters
# named), which is what a sharded (FSDP) run can gather and load.
def training_state(model, optimizer, info: DistInfo) -> tuple[dict, dict, str]:
    """(model state, optimizer state, optimizer format) of the whole model, on rank 0. Under FSDP
    this gathers the shards: every process must call it."""
    if not info.fsdp:
        return model.state_dict(), optimizer.state_dict(), "index"
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives it
    return (get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options),
            "fqn")


def load_optimizer_state(model, optimizer, saved: dict, fmt: str, info: DistInfo) -> None:
    """Restore a checkpoint's optimizer state into `optimizer`, whichever way each run kept it."""
    if fmt == "index" and not info.fsdp:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if fmt == "index":                # written by a replicated run: name its numbered parameters
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        saved = {"state": {order[int(i)]: st for i, st in saved["state"].items()},
                 "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))

"""Parallelism: one process, or several under torchrun (DDP or FSDP), decided once and asked everywhere.

    torchrun --standalone --nproc_per_node=2 scripts/train.py --grad-accum 4 ...     # one machine
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --nproc_per_node=8 scripts/train.py ...

torchrun starts one process per device and tells each its place through environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). `Parallelism.start` reads them once; every
distributed decision of a run is then a method of the object it returns - no other training module
asks which rank it is or whether the model is sharded.

How the work is split, so that N processes compute what one would:
- every process builds the same shuffled order of micro-batches (same seed); process r takes
  micro-batches r, r + N, r + 2N, ... (`loader_shard`, `gptfast.data.RankStridedBatches`);
- the global batch is --batch-size x --grad-accum windows per optimizer step whatever N is: each
  process accumulates grad_accum / N micro-batches (`per_rank_accum`);
- DDP (the default) replicates the model and all-reduces gradients once per optimizer step
  (`sync_gradients` skips the other micro-batches); FSDP (--fsdp) shards weights, gradients and
  AdamW state, so every forward needs all processes: evaluation gives each the same number of turns
  (`evaluation_turns`) and all of them run the epoch sample (`samples_here`);
- the reported loss is the mean over all processes (`mean`); evaluation losses are summed (`sum`);
  a stop on a signal is agreed by all (`agreed_stop`); checkpoints gather the full state on rank 0
  (`full_state`), the only process that prints (`quiet`) and writes (`on_main`).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..device import resolve_device


def launched_world_size() -> int:
    """How many processes torchrun started (1 for a plain `python scripts/train.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _silent(*args, **kwargs) -> None:
    return None


def main_process_echo(echo=print):
    """`echo` in the process torchrun ranked 0 (or a plain run), silence in the others - for what is said
    before a run's `Parallelism` exists or after it is gone (the script's error lines)."""
    return echo if int(os.environ.get("RANK", "0")) == 0 else _silent


def let_the_main_process_speak(seconds: float = 5.0) -> None:
    """Before a process torchrun ranked above 0 exits on an error every process hits (a bad flag, say): wait.
    torchrun stops all processes as soon as one fails, so a fast rank 1 could otherwise stop rank 0 before it
    has printed why (seen on CI). Rank 0, or a plain run, returns at once; a rank still waiting is stopped by
    torchrun when rank 0 exits."""
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(seconds)


@dataclass(frozen=True)
class Parallelism:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0           # this process among all of them
    local_rank: int = 0     # this process on its machine: which GPU it drives
    world_size: int = 1     # processes in total
    fsdp: bool = False      # parameters, gradients and optimizer state sharded (FSDP) instead of replicated

    @classmethod
    def start(cls, device_name: str = "auto", fsdp: bool = False) -> "Parallelism":
        """Join the process group torchrun set up (NCCL for CUDA devices, Gloo for CPU); alone, nothing
        to join. Each process drives the GPU of its local rank."""
        device = resolve_device(device_name)
        world = launched_world_size()
        if world == 1:
            return cls(device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(device, rank, local_rank, world, fsdp)

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # -- who speaks, who writes ---------------------------------------------------------------------------
    def quiet(self, echo):
        """`echo` on rank 0; a function that says nothing on the others."""
        return echo if self.is_main else _silent

    def on_main(self, fn, *args, **kwargs):
        """fn(...) on rank 0 (its result), None on the others."""
        return fn(*args, **kwargs) if self.is_main else None

    @property
    def keeps_weight_copies(self) -> bool:
        """Whether the model may keep 16-bit working copies of its weights: not when FSDP shards them (its
        parameters are gathered anew for every forward)."""
        return not self.fsdp

    def progress(self, wanted: bool) -> bool:
        """Whether this process draws progress bars: rank 0, when they are wanted."""
        return wanted and self.is_main

    @property
    def samples_here(self) -> bool:
        """Whether this process runs the epoch sample: rank 0, or every process of a sharded model."""
        return self.is_main or self.fsdp

    def describe(self, grad_accum: int, batch_size: int, batches_per_epoch: int) -> str | None:
        """The banner's line about the processes (None when alone)."""
        if not self.enabled:
            return None
        return (f"distributed: {self.world_size} processes ({'NCCL' if self.device.type == 'cuda' else 'Gloo'}, "
                f"{'FSDP: model sharded' if self.fsdp else 'DDP: model replicated'}), {grad_accum} micro-batch(es) "
                f"of {batch_size} each per step, {batches_per_epoch} per epoch each")

    # -- splitting the work ---------------------------------------------------------------------------------
    def per_rank_accum(self, grad_accum: int) -> int:
        """Micro-batches each process accumulates so the global batch matches a 1-process run."""
        if grad_accum % self.world_size:
            raise ValueError(f"--grad-accum {grad_accum} must be a multiple of the number of processes "
                             f"({self.world_size})")
        return grad_accum // self.world_size

    def loader_shard(self) -> tuple[int, int]:
        """(rank, world size): which of the shuffled micro-batches this process's train loader yields."""
        return self.rank, self.world_size

    def check_resume_position(self, micro_in_epoch: int) -> None:
        if micro_in_epoch % self.world_size:
            raise ValueError(f"the checkpoint stopped after {micro_in_epoch} micro-batches of its epoch, which "
                             f"{self.world_size} processes cannot split evenly")

    def seed_dropout(self, seed: int, step: int) -> None:
        """Different dropout masks per process (the data order has its own generator); one process keeps
        the RNG exactly as it is, which bitwise resume depends on."""
        if self.enabled:
            torch.manual_seed(seed + 1_000_003 * self.rank + step)

    def evaluation_turns(self, loader, n: int, sharded: bool):
        """The first `n` batches of a 1-process run, split across processes: yields (inputs, targets, counted).
        `sharded`: `loader` already yields only this process's batches. Every batch is fetched (keeps the
        shuffle generators in step). A sharded model computes on all processes together, so each takes the
        same number of turns: extra turns repeat a batch and are not counted."""
        done, fetched = 0, None
        for j, fetched in enumerate(loader):
            i = j * self.world_size + self.rank if sharded else j    # the batch's index in a 1-process run
            if i >= n:
                break
            if sharded or i % self.world_size == self.rank:
                done += 1
                yield fetched[0], fetched[1], True
        for _ in range(-(-n // self.world_size) - done if self.fsdp and fetched is not None else 0):
            yield fetched[0], fetched[1], False

    # -- the model and its gradients --------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """What runs the training forward: the model itself, in DistributedDataParallel (which first
        broadcasts rank 0's weights), or sharded in place with FSDP (fully_shard: each transformer block's
        parameters gathered just before it runs, freed after; embeddings, final LayerNorm and LM head form
        the root group) - in place, so the optimizer sees the shards."""
        if not self.enabled:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.trf_blocks:
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    @staticmethod
    def sync_gradients(forward, sync: bool):
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on micro-batches that are not the last
        of a step."""
        if hasattr(forward, "set_requires_gradient_sync"):          # FSDP2: a switch, not a context
            forward.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if sync or not hasattr(forward, "no_sync"):
            return contextlib.nullcontext()
        return forward.no_sync()

    # -- agreeing ---------------------------------------------------------------------------------------------
    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over all processes (itself when alone)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.sum(value) / self.world_size

    def agreed_stop(self, signum: int | None) -> int | None:
        """The signal to stop on if any process got one (all return the same), else None. One small
        all-reduce per step when several processes run; none when alone."""
        if not self.enabled:
            return signum
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([signum or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. downloads or tokenizes into a shared cache), the others after it
        finished - then find the cached result instead of racing to write it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    # -- checkpoints ------------------------------------------------------------------------------------------
    # Optimizer states in checkpoints: "index" = torch's own optimizer.state_dict() (parameters numbered in
    # optimizer order); "fqn" = torch.distributed.checkpoint's full state dict (parameters named), which is
    # what a sharded (FSDP) run can gather and load.
    def full_state(self, model, optimizer) -> tuple[dict, dict, str]:
        """(model state, optimizer state, optimizer format) of the whole model, on rank 0. Under FSDP this
        gathers the shards: every process must call it."""
        if not self.fsdp:
            return model.state_dict(), optimizer.state_dict(), "index"
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives it
        return (get_model_state_dict(model, options=options),
                get_optimizer_state_dict(model, optimizer, options=options), "fqn")

    def load_optimizer_state(self, model, optimizer, saved: dict, fmt: str) -> None:
        """Restore a checkpoint's optimizer state into `optimizer`, whichever way each run kept it."""
        if fmt == "index" and not self.fsdp:
            optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if fmt == "index":                # written by a replicated run: name its numbered parameters
            names = {id(p): n for n, p in model.named_parameters()}
            order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
            saved = {"state": {order[int(i)]: st for i, st in saved["state"].items()},
                     "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                      for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, optim_state_dict=saved,
                                 options=StateDictOptions(full_state_dict=True))


SINGLE = Parallelism()

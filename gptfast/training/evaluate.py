"""Losses: next-token cross-entropy on a batch, averaged over (part of) a loader."""
from __future__ import annotations

import torch

from .distributed import SINGLE, DistInfo, sum_over_ranks


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model, device) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions over every position of the batch,
    computed by the model itself: the LM head and the loss fused (ops.linear_cross_entropy) on every
    backend but `reference`, so the (B, T, V) logits are never held. `model` may be a wrapper
    (DistributedDataParallel, FSDP, torch.compile) of a GPTModel."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)   # (B, T)
    return model(input_batch, target_batch)                                        # scalar loss


@torch.no_grad()
def calc_loss_loader(loader, model, device, num_batches: int | None = None, dist_info: DistInfo = SINGLE,
                     sharded: bool = False) -> float:
    """Average batch loss over the first `num_batches` batches (all when None).

    With several processes the batches are split between them and the sum of their losses is
    all-reduced: the result is the same as one process averaging those batches. `sharded`: the
    loader already yields only this process's batches (every world_size-th, see RankStridedBatches);
    otherwise every process sees all batches and takes every world_size-th itself.
    """
    rank, world = dist_info.rank, dist_info.world_size
    available = len(loader) * (world if sharded else 1)
    n = available if num_batches is None else min(num_batches, available)
    if n == 0:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    for j, (inputs, targets) in enumerate(loader):   # always fetch one: keeps the shuffle generators in step
        i = j * world + rank if sharded else j       # the batch's index in a 1-process run
        if i >= n:
            break
        if sharded or i % world == rank:
            total += calc_loss_batch(inputs, targets, model, device).double()
            done += 1
    if dist_info.fsdp:   # a sharded model runs forward on all processes together: equal turns, extras ignored
        for _ in range(-(-n // world) - done):
            calc_loss_batch(inputs, targets, model, device)
    return sum_over_ranks(total, dist_info).item() / n


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int,
                   dist_info: DistInfo = SINGLE) -> tuple[float, float]:
    """Train and validation loss over `eval_iter` batches each, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, dist_info, sharded=dist_info.enabled)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, dist_info)
    finally:
        model.train(was_training)
    return train_loss, val_loss

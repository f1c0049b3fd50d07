"""Losses: next-token cross-entropy on a batch, averaged over (part of) a loader."""
from __future__ import annotations

import torch

from .parallel import SINGLE, Parallelism


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model, device) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions over every position of the batch,
    computed by the model itself: the LM head and the loss fused (ops.linear_cross_entropy) on every
    backend but `reference`, so the (B, T, V) logits are never held. `model` may be a wrapper
    (DistributedDataParallel, FSDP, torch.compile) of a GPTModel."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)   # (B, T)
    return model(input_batch, target_batch)                                        # scalar loss


@torch.no_grad()
def calc_loss_loader(loader, model, device, num_batches: int | None = None, parallel: Parallelism = SINGLE,
                     sharded: bool = False) -> float:
    """Average batch loss over the first `num_batches` batches (all when None).

    With several processes the batches are split between them (`Parallelism.evaluation_turns`) and the
    sum of their losses is all-reduced: the result is the same as one process averaging those batches.
    `sharded`: the loader already yields only this process's batches (every world_size-th, see
    RankStridedBatches); otherwise every process sees all batches and takes its share itself.
    """
    available = len(loader) * (parallel.world_size if sharded else 1)
    n = available if num_batches is None else min(num_batches, available)
    if n == 0:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets, counted in parallel.evaluation_turns(loader, n, sharded):
        loss = calc_loss_batch(inputs, targets, model, device)
        if counted:
            total += loss.double()
    return parallel.sum(total).item() / n


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int,
                   parallel: Parallelism = SINGLE) -> tuple[float, float]:
    """Train and validation loss over `eval_iter` batches each, in eval mode (no dropout). The train
    loader of a run with several processes yields this process's share; the validation loader all."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, parallel, sharded=parallel.enabled)
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, parallel)
    finally:
        model.train(was_training)
    return train_loss, val_loss

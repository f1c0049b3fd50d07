"""Losses: next-token cross-entropy on a batch, averaged over (part of) a loader."""
from __future__ import annotations

import torch

from .. import ops


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model, device) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions over every position of the batch,
    computed by the model's op backend (the triton one fuses softmax and gradient)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)   # (B, T)
    logits = model(input_batch)                                                    # (B, T, V)
    return ops.cross_entropy(logits.flatten(0, 1), target_batch.flatten(), backend=model.backend)


@torch.no_grad()
def calc_loss_loader(loader, model, device, num_batches: int | None = None) -> float:
    """Average batch loss over the first `num_batches` batches (all when None)."""
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    if n == 0:
        return float("nan")
    total = 0.0
    for i, (inputs, targets) in enumerate(loader):
        if i >= n:
            break
        total += calc_loss_batch(inputs, targets, model, device).item()
    return total / n


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """Train and validation loss over `eval_iter` batches each, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    finally:
        model.train(was_training)
    return train_loss, val_loss

"""The textbook training loop (the book's `train_model_simple`): read this before loop.py.

One step: logits for every position, cross-entropy against the next tokens, backward, optimizer step.
`train_simple` repeats it over a loader for some epochs, printing an evaluation now and then.

What `train` (loop.py) adds on top, each for a reason, none changing the math: the LM head fused with the
loss (the (B, T, V) logits never exist: ops.linear_cross_entropy), gradient accumulation and clipping, a
learning-rate schedule, bf16 autocast with working copies of the weights (precision.py), several processes
(parallel.py), checkpoints that resume exactly, and Ctrl-C that loses nothing. tests/test_training.py checks
that a `train_step` and the fast path's step give the same loss and the same gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["train_step", "train_simple"]


def train_step(model, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """One optimizer step on a batch: inputs and targets (B, T), targets = inputs shifted by one token."""
    optimizer.zero_grad()
    logits = model(inputs)                                       # (B, T, V)
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))   # mean over the B*T positions
    loss.backward()                                              # d loss / d every weight
    optimizer.step()                                             # the weights move against their gradients
    return loss.item()


@torch.no_grad()
def mean_loss(model, loader, num_batches: int) -> float:
    """The mean loss over the first num_batches batches of loader, without dropout."""
    model.eval()
    losses = []
    for i, (inputs, targets) in enumerate(loader):
        if i == num_batches:
            break
        logits = model(inputs)
        losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    model.train()
    return sum(losses) / max(len(losses), 1)


def train_simple(model, train_loader, val_loader, optimizer, epochs: int, eval_freq: int = 5,
                 eval_iter: int = 5) -> tuple[list[float], list[float]]:
    """Train for `epochs` over train_loader; every eval_freq steps print and record the train and validation
    loss (over eval_iter batches each). Returns (train_losses, val_losses)."""
    train_losses, val_losses, step = [], [], 0
    model.train()
    for epoch in range(1, epochs + 1):
        for inputs, targets in train_loader:
            train_step(model, optimizer, inputs, targets)
            if step % eval_freq == 0:
                train_losses.append(mean_loss(model, train_loader, eval_iter))
                val_losses.append(mean_loss(model, val_loader, eval_iter))
                print(f"Ep {epoch} (Step {step:06d}): Train loss {train_losses[-1]:.3f}, Val loss {val_losses[-1]:.3f}")
            step += 1
    return train_losses, val_losses

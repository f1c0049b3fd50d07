"""Training precision: 16-bit working copies of the linear layers' weights for autocast.

Under bfloat16 autocast every linear layer would cast its float32 weight to bf16 on every forward (and
once more in the backward). Instead the model keeps a bf16 working copy of each weight, refreshed once per
optimizer step: the same numbers autocast would make, made once. The float32 weights stay the masters that
AdamW updates and checkpoints save; the copies are plain attributes (not saved, not moved by `.to()`: make
them once the model is on its device). Bit-for-bit the training autocast alone gives
(tests/test_training_options.py).

The hook: gpt.py's `Linear.weight_for(x)` returns the weight that multiplies x; `keep_working_copies` puts
a `WorkingCopy` in its place on every Linear (the LM head's too).
"""
from __future__ import annotations

import torch

from ..model import Linear

__all__ = ["WorkingCopy", "keep_working_copies", "refresh_working_copies"]


class _MasterAsCopy(torch.autograd.Function):
    """The float32 master weight as its 16-bit working copy: forward returns the copy (no cast), backward
    hands the 16-bit gradient to the master in float32 - what autocast's per-forward cast does, minus the cast."""

    @staticmethod
    def forward(ctx, master, working):
        return working.view_as(working)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.float32), None


class WorkingCopy:
    """A Linear's `weight_for`: its weight in the autocast dtype while autocast at that dtype is on, the
    float32 master otherwise."""

    def __init__(self, master: torch.nn.Parameter, dtype: torch.dtype):
        self.master = master
        self.copy = master.detach().to(dtype)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        kind = like.device.type
        if not torch.is_autocast_enabled(kind) or torch.get_autocast_dtype(kind) != self.copy.dtype:
            return self.master
        return _MasterAsCopy.apply(self.master, self.copy)


def keep_working_copies(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep a `dtype` copy of every Linear's weight for autocast at `dtype` to use instead of casting the
    float32 weight on every forward; refresh_working_copies(model) after each optimizer step."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.weight_for = WorkingCopy(m.weight, dtype)


def working_copies(model: torch.nn.Module) -> list[WorkingCopy]:
    return [m.weight_for for m in model.modules() if isinstance(m, Linear) and isinstance(m.weight_for, WorkingCopy)]


@torch.no_grad()
def refresh_working_copies(model: torch.nn.Module) -> None:
    """The working copies = the float32 weights, rounded: one multi-tensor pass."""
    copies = working_copies(model)
    if copies:
        torch._foreach_copy_([c.copy for c in copies], [c.master for c in copies])

"""The mean over the kept rows of a loss, shared by the cross-entropy ops' backends (the C++ wrappers and the
Triton kernels): rows whose target is ignore_index do not count, and when none is kept the mean is NaN (as
F.cross_entropy's) but its gradient zero (as PyTorch's) - not 0 * inf = NaN in every gradient."""
from __future__ import annotations

import torch


def inverse_count(n_kept: torch.Tensor) -> torch.Tensor:
    """1 / n_kept, or 0 when every target is ignored."""
    return torch.where(n_kept > 0, 1.0 / n_kept, torch.zeros_like(n_kept))


def mean_over_kept(loss_rows: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The mean of the per-row losses over the rows whose target is not ignore_index."""
    n_kept = (targets != ignore_index).sum()           # int64: the division promotes, no widened copy
    mean = loss_rows.sum() / n_kept.clamp_min(1)
    return torch.where(n_kept > 0, mean, torch.full_like(mean, float("nan")))

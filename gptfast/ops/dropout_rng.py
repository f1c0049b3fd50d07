"""The counter-based RNG behind attention dropout, in PyTorch (twin of csrc/dropout_hash.h).

Whether attention weight (bh, row, col) is kept depends only on (seed, bh, row, col):

    h    = mix32(col + mix32(row + mix32(bh + mix32(seed_lo + mix32(seed_hi)))))   (mod 2^32)
    keep = (h >> 8) >= floor(p * 2^24)

so the backward pass regenerates the forward's mask instead of storing it, and every backend
drops exactly the same weights. PyTorch has no uint32 arithmetic on all ops, so the 32-bit math is
done in int64 with explicit masking; multiplications are split into 16-bit halves so no
intermediate leaves the int64 range.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finalizer on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    return int(p * 16777216.0)


def dropout_keep_mask(seed, n_bh: int, n_rows: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (n_bh, n_rows, n_cols) for attention weights.

    `seed`: an int or a one-element int64 tensor (kept a tensor so torch.compile can trace it);
    read as a 64-bit pattern, split into its low and high 32-bit halves.
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64)
    seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    lo = seed & MASK32
    hi = (seed >> 32) & MASK32          # arithmetic shift of a negative int64: mask the sign bits
    bh = torch.arange(n_bh, dtype=torch.int64, device=device)
    head_key = mix32((bh + mix32((lo + mix32(hi)) & MASK32)) & MASK32)           # (n_bh,)
    rows = torch.arange(n_rows, dtype=torch.int64, device=device)
    row_key = mix32((rows[None, :] + head_key[:, None]) & MASK32)                # (n_bh, n_rows)
    cols = torch.arange(n_cols, dtype=torch.int64, device=device)
    h = mix32((cols[None, None, :] + row_key[:, :, None]) & MASK32)             # (n_bh, n_rows, n_cols)
    return (h >> 8) >= dropout_threshold(p)

"""Input checks shared by the op interface and the kernels' own entry points (which can be called
directly): each names the argument that is wrong and what was expected."""
from __future__ import annotations

import torch


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_floating(name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, nh, Tq, hs); k and v (B, nh, Tk, hs) with Tk >= Tq, all of q's dtype and device."""
    check_floating("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 (B, nh, T, hs), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_like(name, t, "q", q)
        if t.ndim != 4 or t.shape[:2] != q.shape[:2] or t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must have shape (B, nh, Tk, hs) matching q's B, nh, hs {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"k holds {k.shape[2]} positions, fewer than q's {q.shape[2]}: the queries must be the "
                         "last positions of the keys")

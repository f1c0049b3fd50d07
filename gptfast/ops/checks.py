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


def check_targets(targets: torch.Tensor, name: str, t: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Class ids for the rows of `t` (named `name`, shape (..., X)): int64, shape t.shape[:-1], on t's
    device, each in [0, vocab) or ignore_index. The range is checked in eager mode only - a
    data-dependent check would break a compiled graph - at the cost of one device sync; a wrong id
    would otherwise read out of bounds."""
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be an int64 tensor, got {targets.dtype}")
    if targets.shape != t.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(t.shape[:-1])} to match {name}, got {tuple(targets.shape)}")
    if targets.device != t.device:
        raise ValueError(f"targets is on {targets.device} but {name} is on {t.device}")
    if not torch.compiler.is_compiling():
        bad = ((targets < 0) & (targets != ignore_index)) | (targets >= vocab)
        if bool(bad.any()):
            raise ValueError(f"targets hold ids outside [0, {vocab}) that are not ignore_index ({ignore_index})")


def check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                        bias: torch.Tensor | None, weight_dtype: torch.dtype | None) -> None:
    """x (..., K) floating; weight (N, K) of `weight_dtype` (None: x's dtype) on x's device; scales
    (N,) float32 (int8 weights need them); bias (N,) of x's dtype."""
    check_floating("x", x)
    if x.ndim < 1:
        raise ValueError("x must have shape (..., K), got a 0-dim tensor")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    want = weight_dtype or x.dtype
    if weight.dtype != want:
        raise TypeError(f"weight must be {want}" + ("" if weight_dtype else " (x's dtype)") + f", got {weight.dtype}")
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N, K) with K = x's last dim ({x.shape[-1]}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    N = weight.shape[0]
    for name, t, dtype in (("scales", scales, torch.float32), ("bias", bias, x.dtype)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) - one per output row of weight - got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

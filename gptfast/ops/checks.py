"""Input checks shared by the op modules: each names the argument that is wrong and what was expected."""
from __future__ import annotations

import torch


def autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled for a device type, False for one autocast does not know (meta tensors)."""
    return device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type)


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

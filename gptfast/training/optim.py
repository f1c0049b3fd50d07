"""Optimizer, learning-rate schedule and precision for a training run."""
from __future__ import annotations

import contextlib
import math

import torch


def make_optimizer(model, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices (and embeddings) only: biases and LayerNorm
    parameters (1-D) are not decayed. PyTorch's fused kernel on CUDA and CPU (one pass over each
    parameter's weights, grads and moments; on 2 CPU cores 8.5 ms a step for the tiny preset instead of
    43 ms multi-tensor, 44 ms instead of 192 ms for cpu-small), multi-tensor (foreach) elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]   # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    impl = {"fused": True} if torch.device(device).type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, **impl)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, min_lr: float | None = None) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from `lr` to `min_lr` at the last step.
    With no warm-up and min_lr = lr (the defaults) the rate is constant."""
    min_lr = lr if min_lr is None else min_lr
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *PRECISIONS)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")        # bfloat16 matrix instructions: native bf16 dot products


def bf16_matmul_hardware(device, flags: set[str] | None = None) -> str | None:
    """Why `device` multiplies bfloat16 natively (a CUDA GPU of sm_80 or later: bf16 tensor cores; a CPU
    with avx512_bf16 or AMX-BF16), or None when it does not."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor} has bf16 tensor cores" if major >= 8 else None
    if device.type != "cpu":
        return None
    from ..compiled import cpu_flags

    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_CPU_FLAGS if f in (flags or set())]
    return f"this CPU has {' and '.join(found)}" if found else None


def resolve_precision(dtype: str, device, flags: set[str] | None = None) -> tuple[str, str]:
    """(float32 | bfloat16 | float16, why) for --dtype. `auto`: bfloat16 autocast where the hardware has
    bfloat16 matrix instructions (there it is several times faster, with the same loss curve), float32
    elsewhere (where bf16 matmuls would be emulated, far slower)."""
    if dtype != "auto":
        return dtype, "--dtype"
    why = bf16_matmul_hardware(device, flags)
    if why:
        return "bfloat16", f"auto: {why}"
    if torch.device(device).type == "cuda":
        return "float32", "auto: this GPU has no bf16 tensor cores (before sm_80)"
    return "float32", f"auto: this CPU has no bf16 matrix instructions ({', '.join(BF16_CPU_FLAGS)})"


def check_precision(dtype: str, device) -> None:
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_CHOICES)}")
    if dtype == "float16" and torch.device(device).type != "cuda":
        raise ValueError("--dtype float16 needs a CUDA device (use bfloat16 on CPU)")


def precision_note(dtype: str, device, flags: set[str] | None = None) -> str | None:
    """A warning worth printing before a run: bfloat16 on a CPU without bfloat16 matrix instructions
    (avx512_bf16, amx_bf16), where PyTorch's bfloat16 matmuls are emulated - 55x slower than float32
    for a 512x768x3072 product on a Zen 3 (benchmarks/NOTES.md)."""
    from ..compiled import cpu_flags

    if dtype != "bfloat16" or torch.device(device).type != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or flags & set(BF16_CPU_FLAGS):
        return None
    return ("note: this CPU has no bfloat16 matrix instructions (avx512_bf16, amx_bf16), so PyTorch's bfloat16 "
            "matmuls run far slower than float32 here; --dtype float32 will be faster")


def autocast(dtype: str, device):
    """Mixed precision for the forward pass: matmuls in `dtype`, master weights stay float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[dtype])


def grad_scaler(dtype: str, device):
    """float16 needs loss scaling against gradient underflow; bfloat16 and float32 do not."""
    enabled = dtype == "float16"
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)

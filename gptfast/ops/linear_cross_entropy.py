"""The LM head fused with the loss: the mean cross-entropy of logits = hidden @ weight^T, without holding the
logits.

    loss = cross_entropy(hidden (N, C) @ weight (V, C)^T, targets)        (N, V) logits, never all at once

Why: at GPT-2's vocabulary the logits are the largest tensor of training (B x T x 50,257 floats, 1.6 GB at
8 x 1024), kept for the backward. The fused kernels (csrc/linear_cross_entropy.cpp, which runs on CPU and CUDA;
ops/triton/cross_entropy.py) go through the rows in chunks: one chunk's logits from one GEMM, its loss and
gradient softmax - onehot at once, then dH_chunk = dL W and dW += dL^T h, so the peak extra memory is one chunk
(`chunk_rows`: as many rows as fit `GPTFAST_LCE_BUDGET_MB`, default 64 MiB). The forward already holds both
gradients; the backward scales them by the upstream gradient.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .checks import autocast_on, check_floating, check_like, check_targets
from .cross_entropy import GPT2_VOCAB, reference as cross_entropy_reference
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, randn, register, stat_dtype

LCE_BUDGET_ENV = "GPTFAST_LCE_BUDGET_MB"
LCE_DEFAULT_BUDGET_MB = 64


def linear_cross_entropy_chunk_rows(n_rows: int, vocab: int, budget_mb: float | None = None) -> int:
    """Rows per chunk of the fused LM head + loss: as many as keep one chunk's float32 logits within
    `budget_mb` (default $GPTFAST_LCE_BUDGET_MB or 64 MiB), at least 16 (GEMMs stay efficient), at
    most n_rows. GPT-2's vocabulary (50,257) gives 333 rows: 64 MiB instead of N x 201 KB."""
    budget = budget_mb if budget_mb is not None else float(os.environ.get(LCE_BUDGET_ENV, LCE_DEFAULT_BUDGET_MB))
    rows = int(budget * 2**20) // (4 * max(vocab, 1))
    return max(1, min(n_rows, max(16, rows)))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_rows: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight^T against targets, without holding the logits.

    hidden (..., C), weight (V, C) (the LM head, or the tied embedding), targets (...) int64; targets
    equal to `ignore_index` are left out of the mean. The fused backends go through the rows in chunks of
    `chunk_rows` (default: linear_cross_entropy_chunk_rows), so peak extra memory is one chunk of logits.
    Under autocast the products run in the autocast dtype and the log-sum-exp and loss in float32.
    """
    check_floating("hidden", hidden)
    if autocast_on(hidden.device.type):         # both go to the autocast dtype below
        check_floating("weight", weight)
        if weight.device != hidden.device:
            raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    else:
        check_like("weight", weight, "hidden", hidden)
    if hidden.ndim < 2 or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden must have shape (..., C) and weight (V, C) with the same C, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    V = weight.shape[0]
    check_targets(targets, "hidden", hidden, V, ignore_index)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    chunk_rows = chunk_rows or linear_cross_entropy_chunk_rows(hidden.shape[0], V)
    device_type = hidden.device.type
    if autocast_on(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return get_backend(backend).linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_rows)
    return get_backend(backend).linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_rows)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
              chunk_rows: int | None = None) -> torch.Tensor:
    """The LM head, then the loss: logits = hidden (N, C) @ weight (V, C)^T, all (N, V) of them, then the
    cross-entropy (cross_entropy.py). `chunk_rows` is for the fused kernels; the textbook has no chunks."""
    logits = hidden @ weight.t()                                  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):          # the loss and its lse in float32
        logits = logits.float()
    return cross_entropy_reference(logits, targets, ignore_index)


def torch_twin(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
               chunk_rows: int | None = None) -> torch.Tensor:
    """What a user would write: the full (N, V) logits, then PyTorch's loss."""
    logits = F.linear(hidden, weight)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(hidden, weight, targets, ignore_index, chunk_rows, compute_grad):
    loss = hidden.new_empty((), dtype=stat_dtype(hidden.dtype))
    if not compute_grad:
        return loss, hidden.new_empty((0,)), weight.new_empty((0,))
    return (loss, torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _autograd(_bwd=None):
    """The forward already holds the gradients of the mean loss (it formed them chunk by chunk, so the
    logits never had to be kept); the backward scales them by the upstream scalar."""
    def setup(ctx, inputs, output):
        ctx.compute_grad = inputs[5]
        _loss, grad_hidden, grad_weight = output
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(grad_hidden, grad_weight)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _gh, _gw):
        if not ctx.compute_grad:
            raise RuntimeError("linear_cross_entropy_fwd was called with compute_grad=False; its gradient is "
                               "unavailable")
        if grad_loss is None:
            return None, None, None, None, None, None
        grad_hidden, grad_weight = ctx.saved_tensors
        # out of place: scaling the saved buffers in place would save one V x C copy in eager mode, but
        # breaks functionalization (torch.compile, opcheck) and a second backward (retain_graph)
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
                None, None, None, None)

    return setup, backward


def compiled(k, backend: str):
    def linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_rows):
        compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return k.linear_cross_entropy_fwd(hidden, weight, targets, ignore_index, chunk_rows, compute_grad)[0]
    return linear_cross_entropy


# ----------------------------------------------------------------------------- cases
def _case(N: int, C: int, V: int, ignored: float = 0.0, chunk_rows: int | None = None, strided: bool = False,
          small: bool = True, big: bool = False, found: str = "") -> Case:
    """hidden (N, C), weight (V, C) at GPT-2's init scale; `chunk_rows` that does not divide N (the fused
    kernels' chunk loop), a fraction `ignored` of targets -100; `strided`: hidden is every other column of a
    leaf twice as wide, weight a transposed (C, V) leaf and the targets every other element."""
    g = torch.Generator().manual_seed(N * 13 + V)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored:
        targets = torch.where(torch.rand(N, generator=g) < ignored, -100, targets)
        targets[-1] = 0
    if strided:                                       # the targets every other element, the rest out of range
        targets = torch.stack([targets, torch.full_like(targets, V + 5)], 1).flatten()

    def build(g):
        return {"hidden": randn(g, N, 2 * C if strided else C),
                "weight": randn(g, *((C, V) if strided else (V, C)), scale=0.05)}

    def call(backend, t):
        h, w = (t["hidden"][:, ::2], t["weight"].t()) if strided else (t["hidden"], t["weight"])
        targets = t["targets"][::2] if strided else t["targets"]
        return linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows, backend=backend)
    label = f"{N}x{C} @ {V}x{C}" + (f" chunks of {chunk_rows}" if chunk_rows else "") + \
        (f" ignore_index on {int((targets == -100).sum())} rows" if ignored else "") + (" strided" if strided else "")
    return Case(label, build, call, extra={"targets": targets}, small=small, big=big, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case(7, 32, 1003, chunk_rows=3, found="chunks that do not divide N"), _case(1, 64, 257),
           _case(100, 48, 2000, ignored=0.2, chunk_rows=32),
           _case(9, 33, 129, chunk_rows=4, strided=True, found="strided hidden, targets, transposed weight")]
    if not quick:
        out += [_case(512, 768, GPT2_VOCAB, ignored=0.05, small=False, big=True),
                _case(1000, 768, 50304, small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
    return [BadInput(lambda: linear_cross_entropy(h, w[:, :5], t), ValueError, "hidden must have shape"),
            BadInput(lambda: linear_cross_entropy(h, w.double(), t), TypeError, "weight has dtype torch.float64"),
            BadInput(lambda: linear_cross_entropy(h, w, t, chunk_rows=0), ValueError, "chunk_rows must be >= 1"),
            BadInput(lambda: linear_cross_entropy(h, w, t[:2]), ValueError, r"targets must have shape \(4,\)"),
            BadInput(lambda: linear_cross_entropy(h, w, t + 9), ValueError, r"targets hold ids outside \[0, 10\)")]


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"linear_cross_entropy": [(256, 64, 4096)]}
    return {"linear_cross_entropy": [(8 * 1024, 768, GPT2_VOCAB), (8 * 1024, 768, 50304), (16 * 1024, 768, GPT2_VOCAB)]}


def bench(key: str, shape: tuple) -> Bench:
    N, C, V = shape                            # hidden (N, C), weight (V, C): GPT-2's LM head

    def inputs(g):
        return ([randn(g, N, C), randn(g, V, C, scale=0.05)], (torch.randint(0, min(V, GPT2_VOCAB), (N,), generator=g),))

    def work(dtype, mode):                     # the logits GEMM; the backward two more
        return 2 * N * C * V * (3 if mode == "fwd+bwd" else 1)
    return Bench(key, shape, inputs, lambda h, w, t, backend: linear_cross_entropy(h, w, t, backend=backend), work,
                 "GFLOP/s", peak_memory=True, time_reference=False)


register(Op("linear_cross_entropy", linear_cross_entropy, reference, torch_twin, cases, bad_inputs, bench_shapes,
            bench,
            kernels={"linear_cross_entropy_fwd": Kernel(_fake_fwd, _autograd)}, compiled=compiled, memory_first=True,
            module=__name__))

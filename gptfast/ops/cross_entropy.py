"""Cross-entropy: the next-token loss, the mean over rows of -log softmax(logits)[target].

    loss_row = logsumexp(logits_row) - logits_row[target]        rows whose target is ignore_index don't count

Kernels: csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu, ops/triton/cross_entropy.py. One pass over a
row gives its max and sum of exponentials (online, as attention does), and with them the loss and - while the
row is still in cache - its gradient softmax - onehot, which the backward only scales by the upstream gradient
(no second pass over the (N, V) logits, no softmax kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_floating, check_targets
from .loss_math import mean_over_kept
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register, stat_dtype

GPT2_VOCAB = 50257


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  backend: str | None = None) -> torch.Tensor:
    """Mean next-token loss: logits (..., V) against integer targets (...); targets equal to
    `ignore_index` are left out of the mean."""
    check_floating("logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"logits must have shape (..., V) with at least 2 dims, got {tuple(logits.shape)}")
    V = logits.shape[-1]
    check_targets(targets, "logits", logits, V, ignore_index)
    return get_backend(backend).cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over rows of -log softmax(logits)[target]; rows whose target is ignore_index don't count.

    logits (N, V), targets (N,). -log softmax(x)[t] = logsumexp(x) - x[t], with
    logsumexp(x) = m + log(sum(exp(x - m))), m = max(x) (shifting by m keeps exp from overflowing).
    """
    m = logits.max(dim=-1, keepdim=True).values                                   # (N, 1)
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))             # (N,)
    valid = targets != ignore_index
    picked = logits.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    losses = torch.where(valid, lse - picked, torch.zeros_like(lse))
    return losses.sum() / valid.sum()


def torch_twin(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(logits, targets, ignore_index, compute_grad):
    N, stat = logits.shape[0], stat_dtype(logits.dtype)
    return (torch.empty((N,), dtype=stat, device=logits.device), torch.empty((N,), dtype=stat, device=logits.device),
            torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device))


def _fake_bwd(dlogits, grad_loss):
    return torch.empty(dlogits.shape, dtype=dlogits.dtype, device=dlogits.device)


def _autograd(bwd):
    """The forward already wrote dlogits = softmax - onehot; the backward scales each row by its upstream
    gradient. lse and dlogits are outputs without a gradient."""
    def setup(ctx, inputs, output):
        ctx.compute_grad = inputs[3]
        _loss, lse, dlogits = output
        ctx.save_for_backward(dlogits)
        ctx.mark_non_differentiable(lse, dlogits)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, _glse, _gdl):
        if not ctx.compute_grad:
            raise RuntimeError("cross_entropy_fwd was called with compute_grad=False; its gradient is unavailable")
        if grad_loss is None:
            return None, None, None, None
        (dlogits,) = ctx.saved_tensors
        return bwd(dlogits, grad_loss), None, None, None

    return setup, backward


def compiled(k, backend: str):
    def cross_entropy(logits, targets, ignore_index=-100):
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
        loss_rows = k.cross_entropy_fwd(logits, targets, ignore_index, compute_grad)[0]
        return mean_over_kept(loss_rows, targets, ignore_index)
    return cross_entropy


# ----------------------------------------------------------------------------- cases
def _targets(N: int, V: int, ignored: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored:
        drop = torch.rand(N, generator=g) < ignored
        drop[0] = True                                   # at least one ignored row
        if N > 1:
            drop[-1] = False                             # and at least one counted
        targets = torch.where(drop, -100, targets)
    return targets


def _case(N: int, V: int, ignored: float = 0.0, view: str = "", small: bool = True, big: bool = False,
          found: str = "") -> Case:
    """logits (N, V) scaled like a trained model's; a fraction `ignored` of the targets is -100. view
    "transposed": logits is a (V, N) leaf seen through .t(); "strided targets": the targets are every other
    element of a tensor twice as long."""
    targets = _targets(N, V, ignored, N * 7 + V)
    if view == "strided targets":
        targets = torch.stack([targets, torch.full_like(targets, V + 5)], 1).flatten()   # odd ones out of range

    def build(g):
        return {"logits": randn(g, *((V, N) if view == "transposed" else (N, V)), scale=3.0)}

    def call(backend, t):
        logits = t["logits"].t() if view == "transposed" else t["logits"]
        targets = t["targets"][::2] if view == "strided targets" else t["targets"]
        return cross_entropy(logits, targets, ignore_index=-100, backend=backend)
    label = f"{N}x{V}" + (f" ignore_index on {int((targets == -100).sum())} rows" if ignored else "") + \
        (f" {view}" if view else "")
    return Case(label, build, call, extra={"targets": targets}, small=small, big=big, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case(1, 1023), _case(7, GPT2_VOCAB, found="GPT-2's odd vocabulary: a partial last vector per row"),
           _case(64, 1023, ignored=0.25), _case(16, 1023, view="transposed", found="non-contiguous logits"),
           _case(3, 33), _case(5, 129, ignored=0.3, view="strided targets", found="a strided targets view")]
    if not quick:
        out += [_case(256, GPT2_VOCAB, ignored=0.1, small=False, big=True), _case(128, 50304, small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    logits, t = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    return [BadInput(lambda: cross_entropy(logits[0], t[:1]), ValueError, "logits must have shape"),
            BadInput(lambda: cross_entropy(logits, t.int()), TypeError, "targets must be an int64 tensor"),
            BadInput(lambda: cross_entropy(logits, t[:3]), ValueError, r"targets must have shape \(4,\)"),
            BadInput(lambda: cross_entropy(logits, t + 7), ValueError, r"targets hold ids outside \[0, 10\)"),
            BadInput(lambda: cross_entropy(logits.long(), t), TypeError, "logits must be a floating-point tensor")]


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"cross_entropy": [(64, GPT2_VOCAB)]}
    return {"cross_entropy": [(8 * 128, GPT2_VOCAB)] if device_type == "cpu" else [(8 * 1024, 50304)]}


def bench(key: str, shape: tuple) -> Bench:
    N, V = shape

    def inputs(g):
        return [randn(g, N, V, scale=2.0)], (torch.randint(0, V, (N,), generator=g),)

    def work(dtype, mode):            # read the logits; the backward counted as twice that
        return N * V * element_size(dtype) * (2 if mode == "fwd+bwd" else 1)
    return Bench(key, shape, inputs, lambda logits, targets, backend: cross_entropy(logits, targets, backend=backend),
                 work)


def peers(name: str, key: str):
    if name == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()
    return None


register(Op("cross_entropy", cross_entropy, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"cross_entropy_fwd": Kernel(_fake_fwd, _autograd, "cross_entropy_bwd"),
                     "cross_entropy_bwd": Kernel(_fake_bwd)},
            compiled=compiled, peers=peers, native_16bit=True, module=__name__))

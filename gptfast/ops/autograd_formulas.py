"""The autograd wiring of each forward op to its backward op, shared by every compiled backend.

Each op contract (csrc/ops.cpp) is the same for the C++/CUDA ops and the Triton ops, so so is the
way their gradients flow: `formulas(bwd)` returns (setup_context, backward) for
`torch.library.register_autograd`, given that backend's backward op. Statistics outputs (mean,
rstd, lse, dlogits) are marked non-differentiable, and their (absent) gradients are not materialized:
autograd would otherwise hand the backward a zero-filled tensor per such output - for the
cross-entropy's dlogits and the fused loss's saved gradients, N x V and V x C of zeros allocated
and written on every backward, only to be ignored.
"""
from __future__ import annotations

import torch


def layer_norm(bwd):
    def setup(ctx, inputs, output):
        x, weight, _bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, _dmean, _drstd):
        if dy is None:
            return None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = bwd(dy, x, weight, mean, rstd)
        return dx, dweight, dbias, None

    return setup, backward


def gelu(bwd):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return bwd(dy, x)

    return setup, backward


def attention(bwd):
    def setup(ctx, inputs, output):
        q, k, v, causal, scale, dropout_p, seed = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, _dlse):
        if dout is None:
            return None, None, None, None, None, None, None
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None

    return setup, backward


def dropout_add(bwd):
    """y = residual + dropout(x): dx regenerates the mask from the seed (nothing else is saved),
    dresidual is dy itself."""
    def setup(ctx, inputs, output):
        x, residual, p, seed = inputs
        ctx.save_for_backward(seed)
        ctx.p, ctx.x_dtype, ctx.has_residual = p, x.dtype, residual is not None
        ctx.set_materialize_grads(False)

    def backward(ctx, dy):
        if dy is None:
            return None, None, None, None
        (seed,) = ctx.saved_tensors
        return bwd(dy, ctx.p, seed, ctx.x_dtype), (dy if ctx.has_residual else None), None, None

    return setup, backward


def cross_entropy(bwd):
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


def linear_cross_entropy(_bwd=None):
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


def inverse_count(n_kept: torch.Tensor) -> torch.Tensor:
    """1 / n_kept, or 0 when every target is ignored: the mean loss is then NaN (as F.cross_entropy's) but
    its gradient zero, as PyTorch's is - not 0 * inf = NaN in every gradient."""
    return torch.where(n_kept > 0, 1.0 / n_kept, torch.zeros_like(n_kept))


def mean_over_kept(loss_rows: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The mean of the per-row losses over the rows whose target is not ignore_index; NaN when none is kept
    (as F.cross_entropy), with a zero gradient then (as PyTorch's), not NaN."""
    n_kept = (targets != ignore_index).sum()           # int64: the division promotes, no widened copy
    mean = loss_rows.sum() / n_kept.clamp_min(1)
    return torch.where(n_kept > 0, mean, torch.full_like(mean, float("nan")))


def register(fwd, formula, bwd) -> None:
    """Attach `formula(bwd)` to the forward op `fwd` (a "ns::name" string or a custom_op)."""
    setup, backward = formula(bwd)
    torch.library.register_autograd(fwd, backward, setup_context=setup)

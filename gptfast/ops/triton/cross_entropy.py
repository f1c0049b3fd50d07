"""Fused cross-entropy for the LM loss in Triton: one program per row of logits.

Forward: a sweep over the vocabulary in BLOCK_V chunks keeps a running max and sum of exponentials
per lane (online softmax), giving lse and the row's loss lse - logit[target]; when gradients are
wanted, a second sweep in the same program writes dlogits = softmax - onehot(target), so nothing
but that gradient (no probabilities, no log-softmax) outlives the forward. The backward only
scales it by the upstream gradient of each row's loss. Rows whose target is `ignore_index` have
loss 0 and gradient 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import autograd_formulas as formulas

from . import INTERPRET


@triton.jit
def _ce_fwd_kernel(logits_ptr, targets_ptr, loss_ptr, lse_ptr, dlogits_ptr, V, ignore_index,
                   COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    target = tl.load(targets_ptr + row)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d_vec = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        # lanes that have seen no logit yet keep m = -inf; shift them by 0 instead (no inf - inf)
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        d_vec = d_vec * tl.exp(m_vec - shift) + tl.exp(x - shift)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    lse = m + tl.log(tl.sum(d_vec * tl.exp(m_vec - m), 0))
    ignored = target == ignore_index
    safe_target = tl.where(ignored, 0, target)
    x_t = tl.load(logits_ptr + base + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_t))
    tl.store(lse_ptr + row, lse)
    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits_ptr + base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            g = tl.where(ignored, 0.0, g)
            tl.store(dlogits_ptr + base + cols, g.to(dlogits_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _scale_rows_kernel(dlogits_ptr, grad_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_ptr + row).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        d = tl.load(dlogits_ptr + row * V + cols, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * V + cols, (d * g).to(out_ptr.dtype.element_ty), mask=cols < V)


def _block_v(V: int) -> int:
    return min(65536 if INTERPRET else 4096, triton.next_power_of_2(V))


@torch.library.custom_op("gptfast_triton::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (N,), lse (N,) in fp32, and dlogits (N, V) if compute_grad (else empty)."""
    if logits.dim() != 2 or logits.dtype == torch.float64 or not logits.is_floating_point():
        raise TypeError(f"logits must be a 2-D float32/float16/bfloat16 tensor, got {logits.dtype} "
                        f"of shape {tuple(logits.shape)}")
    logits, targets = logits.contiguous(), targets.contiguous()
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    dlogits = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    if N:
        _ce_fwd_kernel[(N,)](logits, targets, loss, lse, dlogits, V, ignore_index, COMPUTE_GRAD=compute_grad,
                             BLOCK_V=_block_v(V))
    return loss, lse, dlogits


@torch.library.custom_op("gptfast_triton::cross_entropy_bwd", mutates_args=())
def cross_entropy_bwd(dlogits: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """dlogits scaled row by row by the upstream gradient of each row's loss."""
    dlogits, grad_loss = dlogits.contiguous(), grad_loss.contiguous()
    out = torch.empty_like(dlogits)
    N, V = dlogits.shape
    if N:
        _scale_rows_kernel[(N,)](dlogits, grad_loss, out, V, BLOCK_V=_block_v(V))
    return out


@cross_entropy_fwd.register_fake
def _(logits, targets, ignore_index, compute_grad):
    N = logits.shape[0]
    dl = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    return (torch.empty(N, dtype=torch.float32, device=logits.device),
            torch.empty(N, dtype=torch.float32, device=logits.device), dl)


@cross_entropy_bwd.register_fake
def _(dlogits, grad_loss):
    return torch.empty(dlogits.shape, dtype=dlogits.dtype, device=dlogits.device)


formulas.register(cross_entropy_fwd, formulas.cross_entropy, cross_entropy_bwd)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    loss_rows, _lse, _dl = cross_entropy_fwd(logits, targets, ignore_index, torch.is_grad_enabled() and logits.requires_grad)
    return formulas.mean_over_kept(loss_rows, targets, ignore_index)


@torch.library.custom_op("gptfast_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             chunk_rows: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of gptfast::linear_cross_entropy_fwd (csrc/linear_cross_entropy.cpp): rows in chunks,
    each chunk's logits from one GEMM, reduced by the Triton cross-entropy kernel (loss rows, and the
    chunk's gradient softmax - onehot, in float32), whose GEMMs into dH and dW follow at once."""
    if hidden.dtype == torch.float64:
        raise TypeError("hidden: the Triton linear cross-entropy supports float32, float16 and bfloat16, got float64")
    h, w, t = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    N, C = h.shape
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if compute_grad else h.new_empty(0)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if compute_grad else w.new_empty(0)
    for r0 in range(0, N, chunk_rows):
        hc = h[r0:r0 + chunk_rows]
        logits = (hc @ w.t()).float()                                  # (n, V): one chunk's logits
        loss_c, _lse, dl = cross_entropy_fwd(logits, t[r0:r0 + chunk_rows], ignore_index, compute_grad)
        loss_rows[r0:r0 + chunk_rows] = loss_c
        if compute_grad:
            dl = dl.to(h.dtype)
            torch.mm(dl, w, out=grad_h[r0:r0 + chunk_rows])            # dH_c = dL_c W
            grad_w += (dl.t() @ hc).float()                            # dW += dL_c^T h_c, float32 accumulation
    loss = formulas.mean_over_kept(loss_rows, t, ignore_index)
    if compute_grad:
        inv = formulas.inverse_count((t != ignore_index).sum().float())
        grad_h.mul_(inv.to(grad_h.dtype))
        grad_w = grad_w.mul_(inv).to(w.dtype)                          # in place: no second V x C buffer
    return loss, grad_h, grad_w


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, targets, ignore_index, chunk_rows, compute_grad):
    loss = hidden.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), weight.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight)


formulas.register(linear_cross_entropy_fwd, formulas.linear_cross_entropy, None)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_rows=256):
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return linear_cross_entropy_fwd(hidden, weight, targets, ignore_index, chunk_rows, compute_grad)[0]

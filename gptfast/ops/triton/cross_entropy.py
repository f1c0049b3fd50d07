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

from ..loss_math import inverse_count, mean_over_kept
from . import INTERPRET
from ._aot import TYPES, VOCAB, Specialization
from ._interpreter import interpreted_bf16


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
    if logits.dtype == torch.float64:
        raise TypeError("logits: the Triton cross-entropy supports float32, float16 and bfloat16, got float64")
    if interpreted_bf16(logits):
        loss, lse, dlogits = cross_entropy_fwd(logits.float(), targets, ignore_index, compute_grad)
        return loss, lse, dlogits.to(logits.dtype)
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
    if interpreted_bf16(dlogits):
        return cross_entropy_bwd(dlogits.float(), grad_loss).to(dlogits.dtype)
    dlogits, grad_loss = dlogits.contiguous(), grad_loss.float().contiguous()
    out = torch.empty_like(dlogits)
    N, V = dlogits.shape
    if N:
        _scale_rows_kernel[(N,)](dlogits, grad_loss, out, V, BLOCK_V=_block_v(V))
    return out


@torch.library.custom_op("gptfast_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             chunk_rows: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of gptfast::linear_cross_entropy_fwd (csrc/linear_cross_entropy.cpp): rows in chunks,
    each chunk's logits from one GEMM, reduced by the Triton cross-entropy kernel (loss rows, and the
    chunk's gradient softmax - onehot, in float32), whose GEMMs into dH and dW follow at once."""
    if hidden.dtype == torch.float64:
        raise TypeError("hidden: the Triton linear cross-entropy supports float32, float16 and bfloat16, got float64")
    if interpreted_bf16(hidden):
        loss, gh, gw = linear_cross_entropy_fwd(hidden.float(), weight.float(), targets, ignore_index, chunk_rows,
                                                compute_grad)
        return loss, gh.to(hidden.dtype), gw.to(weight.dtype)
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
    loss = mean_over_kept(loss_rows, t, ignore_index)
    if compute_grad:
        inv = inverse_count((t != ignore_index).sum().float())
        grad_h.mul_(inv.to(grad_h.dtype))
        grad_w = grad_w.mul_(inv).to(w.dtype)                          # in place: no second V x C buffer
    return loss, grad_h, grad_w


def aot_specializations(full: bool) -> list[Specialization]:
    """The forward and the row-scaling backward at GPT-2's vocabulary (float32: the widest loads and registers;
    `full`: every dtype)."""
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t, block_v = TYPES[dt], _block_v(VOCAB)
        types = {"logits_ptr": f"*{t}", "targets_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                 "dlogits_ptr": f"*{t}", "V": "i32", "ignore_index": "i32"}
        out.append(Specialization("ce_fwd", _ce_fwd_kernel, types, {"COMPUTE_GRAD": True, "BLOCK_V": block_v},
                                  label=f"{dt} V{VOCAB} BV{block_v}"))
        types = {"dlogits_ptr": f"*{t}", "grad_ptr": "*fp32", "out_ptr": f"*{t}", "V": "i32"}
        out.append(Specialization("ce_scale_rows", _scale_rows_kernel, types, {"BLOCK_V": block_v},
                                  label=f"{dt} BV{block_v}"))
    return out

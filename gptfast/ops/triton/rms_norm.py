"""RMSNorm in Triton: a block of rows per program, fp32 math, output in the input dtype.

Forward: each program loads ROWS rows of C (padded to a power of two, masked), computes rstd =
1 / sqrt(mean(x^2) + eps) in fp32, writes y = x * rstd * w and rstd. Backward: dx per row, plus per-program
fp32 partial sums of dweight written to a (programs, C) buffer and summed afterwards in a fixed order -
deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import TYPES, Specialization
from ._interpreter import interpreted_bf16
from ._rows import launch_shape

LLAMA_ROWS = (128, 1024, 2048)     # a head (Qwen3's q/k norm), Qwen3-0.6B's and Llama-3.2-1B's hidden states


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, C, eps, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)          # (ROWS, BLOCK_C)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, C,
                    ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    xhat = x * rstd[:, None]
    g = dy * w[None, :]
    c = tl.sum(g * xhat, axis=1) / C
    dx = rstd[:, None] * (g - xhat * c[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * C + cols, tl.sum(dy * xhat, axis=0), mask=col_ok)


def _check(x: torch.Tensor) -> None:
    if x.dtype == torch.float64:
        raise TypeError("x: the Triton RMSNorm supports float32, float16 and bfloat16, got float64")


@torch.library.custom_op("gptfast_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x)
    if interpreted_bf16(x):
        y, rstd = rms_norm_fwd(x.float(), weight.float(), eps)
        return y.to(x.dtype), rstd
    C = x.shape[-1]
    x2 = x.contiguous().view(-1, C)
    n_rows = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        rows, block_c, warps = launch_shape(n_rows, C)
        _rms_fwd_kernel[(triton.cdiv(n_rows, rows),)](x2, weight.contiguous(), y, rstd, n_rows, C, eps,
                                                      ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@torch.library.custom_op("gptfast_triton::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x)
    if interpreted_bf16(x):
        dx, dw = rms_norm_bwd(dy.float(), x.float(), weight.float(), rstd)
        return dx.to(x.dtype), dw.to(weight.dtype)
    C = x.shape[-1]
    x2, dy2 = x.contiguous().view(-1, C), dy.contiguous().view(-1, C)
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    rows, block_c, warps = launch_shape(n_rows, C)
    n_prog = max(1, triton.cdiv(n_rows, rows))
    dw_part = torch.zeros(n_prog, C, dtype=torch.float32, device=x.device)
    if n_rows:
        _rms_bwd_kernel[(n_prog,)](dy2, x2, weight.contiguous(), rstd.contiguous().view(-1), dx, dw_part, n_rows, C,
                                   ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype)      # fixed-order reduction of the partials


def aot_specializations(full: bool) -> list[Specialization]:
    """Both kernels at the Llama/Qwen3 widths (a head, two hidden sizes)."""
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t = TYPES[dt]
        types = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}", "dx_ptr": f"*{t}",
                 "rstd_ptr": "*fp32", "dw_part_ptr": "*fp32", "n_rows": "i32", "C": "i32", "eps": "fp32"}
        for width in LLAMA_ROWS:
            rows, block_c, warps = launch_shape(8192, width)
            for kernel, name in ((_rms_fwd_kernel, "rms_fwd"), (_rms_bwd_kernel, "rms_bwd")):
                out.append(Specialization(name, kernel, types, {"ROWS": rows, "BLOCK_C": block_c}, num_warps=warps,
                                          label=f"{dt} C{width} ROWS{rows} w{warps}"))
    return out

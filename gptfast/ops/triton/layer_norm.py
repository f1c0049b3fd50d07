"""LayerNorm in Triton: a block of rows per program, fp32 statistics, output in the input dtype.

Forward: each program loads ROWS rows of C (padded to a power of two, masked), computes mean and
rstd in fp32 (two passes over the row held in registers: no cancellation), writes y, mean, rstd.
Backward: dx per row, plus per-program fp32 partial sums of dweight/dbias written to a
(programs, C) buffer and summed afterwards in a fixed order - deterministic, no atomics.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._aot import GPT2_ROWS, TYPES, Specialization
from ._interpreter import interpreted_bf16
from ._rows import launch_shape

@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, C, eps,
                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)          # (ROWS, BLOCK_C)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)                  # biased variance
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, n_rows, C,
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
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * w[None, :]
    a = tl.sum(g, axis=1) / C
    c = tl.sum(g * xhat, axis=1) / C
    dx = rstd[:, None] * (g - a[:, None] - xhat * c[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid * C + cols, tl.sum(dy * xhat, axis=0), mask=col_ok)
    tl.store(db_part_ptr + pid * C + cols, tl.sum(dy, axis=0), mask=col_ok)


def _check(x: torch.Tensor) -> None:
    if x.dtype == torch.float64:
        raise TypeError("x: the Triton LayerNorm supports float32, float16 and bfloat16, got float64")


@torch.library.custom_op("gptfast_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x)
    if interpreted_bf16(x):
        y, mean, rstd = layer_norm_fwd(x.float(), weight.float(), bias.float(), eps)
        return y.to(x.dtype), mean, rstd
    C = x.shape[-1]
    x2 = x.contiguous().view(-1, C)
    n_rows = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        rows, block_c, warps = launch_shape(n_rows, C)
        _ln_fwd_kernel[(triton.cdiv(n_rows, rows),)](x2, weight.contiguous(), bias.contiguous(), y, mean, rstd,
                                                     n_rows, C, eps, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@torch.library.custom_op("gptfast_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x)
    if interpreted_bf16(x):
        dx, dw, db = layer_norm_bwd(dy.float(), x.float(), weight.float(), mean, rstd)
        return dx.to(x.dtype), dw.to(weight.dtype), db.to(weight.dtype)
    C = x.shape[-1]
    x2, dy2 = x.contiguous().view(-1, C), dy.contiguous().view(-1, C)
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    rows, block_c, warps = launch_shape(n_rows, C)
    n_prog = max(1, triton.cdiv(n_rows, rows))
    dw_part = torch.zeros(n_prog, C, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(n_prog, C, dtype=torch.float32, device=x.device)
    if n_rows:
        _ln_bwd_kernel[(n_prog,)](dy2, x2, weight.contiguous(), mean.contiguous().view(-1),
                                  rstd.contiguous().view(-1), dx, dw_part, db_part, n_rows, C,
                                  ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    # fixed-order reduction of the per-program partials
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def aot_specializations(full: bool) -> list[Specialization]:
    """Both kernels at GPT-2's widths (each power-of-two block width once)."""
    out = []
    for dt in (list(TYPES) if full else ["float32"]):
        t = TYPES[dt]
        types = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}", "dy_ptr": f"*{t}",
                 "dx_ptr": f"*{t}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dw_part_ptr": "*fp32",
                 "db_part_ptr": "*fp32", "n_rows": "i32", "C": "i32", "eps": "fp32"}
        for width in sorted({triton.next_power_of_2(c): c for c in GPT2_ROWS}.values()):
            rows, block_c, warps = launch_shape(8192, width)
            for kernel, name in ((_ln_fwd_kernel, "ln_fwd"), (_ln_bwd_kernel, "ln_bwd")):
                out.append(Specialization(name, kernel, types, {"ROWS": rows, "BLOCK_C": block_c}, num_warps=warps,
                                          label=f"{dt} C{width} ROWS{rows} w{warps}"))
    return out

"""Causal (or full) attention in Triton, FlashAttention-2 style.

Forward: one program per (query block, batch*head); key blocks stream through SRAM with an
online softmax in base 2 (exp2 of log2(e)-prescaled scores), causal blocks above the diagonal
skipped, fp32 logsumexp saved (natural log). As in the Triton tutorial's FlashAttention-2, the key
loop is split in two: blocks wholly below the diagonal (and inside TK) run with no mask at all, only
the diagonal (and ragged last) blocks build and apply one - at T = 1024 with 128 x 64 tiles, 56 of 72
tiles per head go unmasked. Both backward kernels split their loops the same way. Backward: delta = rowsum(dO * O) first, then two
kernels that recompute P from q, k and lse - one per key block for dK, dV, one per query block for
dQ - so no two programs add into the same output (deterministic, no atomics).

Dropout uses the shared counter-based hash (csrc/dropout_hash.h, gptfast/ops/dropout_rng.py),
computed in int64 with explicit 32-bit masks; the mask equals the reference's bit for bit.
q: (B, H, Tq, D), k, v: (B, H, Tk, D) with Tk >= Tq (grouped-query K/V of fewer heads: repeated by the launchers,
see _kv_per_query_head) - the queries are the last Tq positions (a KV
cache; query row r sits at position r + Tk - Tq, which its causal mask and dropout row use);
D in 16..128 (padded to a power of two and masked).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._aot import TYPES, Specialization
from ._interpreter import interpreted_bf16

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128

# GPU launch configs, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel and tile class: (bytes per
# input element, head dim up to 64 or 128). Every one compiles for sm_80 and sm_90 without register
# spills and within shared memory for the dtypes and head dims of its class, dropout on or off -
# .ci/triton_aot_check.py proves it in CI. (An earlier single list had 128 x 64 tiles with 4 warps
# spilling up to 2.4 KB a thread at float32 / head dim 128 and needing 256 KB of shared memory.)
# 16-bit tiles at head dim 64 are GPT-2 training under autocast; float32 dots run as tf32.
GPU_TILES = {
    "fwd": {(2, 64): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
            (2, 128): [(64, 32, 8, 2), (32, 32, 8, 2), (32, 64, 8, 1)],
            (4, 64): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)],
            (4, 128): [(32, 32, 8, 2), (32, 64, 8, 1)]},
    "dkdv": {(2, 64): [(32, 64, 8, 2), (32, 32, 4, 2)],
             (2, 128): [(32, 64, 8, 2), (32, 64, 8, 1), (32, 32, 8, 2)],
             (4, 64): [(32, 32, 4, 2)],
             (4, 128): [(32, 64, 8, 1), (32, 32, 8, 2)]},
    "dq": {(2, 64): [(64, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
           (2, 128): [(32, 32, 8, 2), (32, 64, 8, 1)],
           (4, 64): [(32, 32, 4, 2)],
           (4, 128): [(32, 32, 8, 2), (32, 64, 8, 1), (16, 32, 4, 2)]},
}


def gpu_tiles(kind: str, elem_bytes: int, block_d: int) -> list[tuple[int, int, int, int]]:
    """The launch configs of kernel `kind` ("fwd", "dkdv", "dq") for inputs of that element size and
    (power-of-two) head dim."""
    return GPU_TILES[kind][(2 if elem_bytes <= 2 else 4, 64 if block_d <= 64 else 128)]


def _autotune_configs(kind: str) -> list:
    if INTERPRET:   # the interpreter cannot benchmark: one config, large blocks (few programs)
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)]
    tiles = dict.fromkeys(t for per_class in GPU_TILES[kind].values() for t in per_class)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]


def _prune(kind: str):
    """Autotuning tries only the configs of this launch's tile class."""
    def prune(configs, nargs, **kwargs):
        allowed = set(gpu_tiles(kind, nargs["q_ptr"].element_size(), kwargs["BLOCK_D"]))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    return {"early_config_prune": prune}


@triton.jit
def _mix32(x):
    # lowbias32 on values in [0, 2^32) held in int64; masks keep every step 32-bit
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _head_key(seed_ptr, bh):
    seed = tl.load(seed_ptr)
    lo = seed & 0xFFFFFFFF
    hi = (seed >> 32) & 0xFFFFFFFF
    return _mix32((bh + _mix32((lo + _mix32(hi)) & 0xFFFFFFFF)) & 0xFFFFFFFF)


@triton.jit
def _keep(head_key, rows, cols, threshold):
    row_key = _mix32((rows.to(tl.int64) + head_key) & 0xFFFFFFFF)
    h = _mix32((cols.to(tl.int64)[None, :] + row_key[:, None]) & 0xFFFFFFFF)
    return (h >> 8) >= threshold


@triton.jit
def _fwd_key_block(acc, l_i, m_i, q, k_ptr, v_ptr, kv_base, rows, dims, dim_ok, start_n, TK, D, off, qk_scale,
                   head_key, threshold, keep_scale, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the online softmax. MASKED=False: every (row, key) pair of the tile is
    visible - the block lies wholly below the diagonal and inside TK - so no mask is built or applied."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        col_ok = cols < TK
        kv_mask = col_ok[:, None] & dim_ok[None, :]
    else:
        kv_mask = dim_ok[None, :]
    k = tl.load(k_ptr + kv_base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale                           # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + off)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep(head_key, rows + off, cols, threshold), p * keep_scale, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _visible_key_blocks(start_m, TK, off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query block start_m: (full, hi). Key blocks starting below `full` are seen whole by every
    row (they end at or before the block's first row's position and inside TK); those from `full`
    to `hi` are the diagonal (and ragged last) blocks that need the mask; none beyond `hi` is seen."""
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M + off, TK)
        full = tl.minimum((start_m * BLOCK_M + off + 1) // BLOCK_N, TK // BLOCK_N) * BLOCK_N
    else:
        hi = TK
        full = (TK // BLOCK_N) * BLOCK_N
    return full, hi


# (Tk is left out of the autotune keys: decoding with a KV cache changes it every step)
@triton.autotune(configs=_autotune_configs("fwd"), key=["TQ", "BLOCK_D", "CAUSAL", "DROPOUT"],
                 prune_configs_by=_prune("fwd"))
@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seed_ptr, TQ, TK, D, qk_scale, threshold, keep_scale,
                     CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    off = TK - TQ                                                    # cached positions before the queries
    base = bh.to(tl.int64) * TQ * D
    kv_base = bh.to(tl.int64) * TK * D
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < TQ
    dim_ok = dims < D
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    head_key = _head_key(seed_ptr, bh) if DROPOUT else 0
    full, hi = _visible_key_blocks(start_m, TK, off, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full, BLOCK_N):                          # below the diagonal: no mask
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, k_ptr, v_ptr, kv_base, rows, dims, dim_ok, start_n, TK, D,
                                       off, qk_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT, False,
                                       BLOCK_N)
    for start_n in range(full, hi, BLOCK_N):                         # the diagonal: masked
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, k_ptr, v_ptr, kv_base, rows, dims, dim_ok, start_n, TK, D,
                                       off, qk_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT, True,
                                       BLOCK_N)
    o = acc / l_i[:, None]
    tl.store(o_ptr + base + rows[:, None] * D + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * TQ + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=row_ok)


@triton.jit
def _recompute(q, k, v, do, lse2, delta, rows, cols, TQ, TK, qk_scale, sm_scale, head_key, threshold, keep_scale,
               CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr):
    """For a (BLOCK_M, BLOCK_N) tile: Z = dropout(P) and dS * sm_scale, zero where masked.
    MASKED=False: the caller knows every pair of the tile is visible (and inside TQ x TK)."""
    off = TK - TQ
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.exp2(s - lse2[:, None])                                       # P = exp(S - lse)
    if MASKED:
        valid = (cols[None, :] < TK) & (rows[:, None] < TQ)
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + off)
        p = tl.where(valid, p, 0.0)
    dz = tl.dot(do, tl.trans(v))                                         # dZ = dO V^T
    if DROPOUT:
        keep = _keep(head_key, rows + off, cols, threshold)
        z = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dz * keep_scale, 0.0)
    else:
        z = p
        dp = dz
    ds = p * (dp - delta[:, None]) * sm_scale
    return z, ds


@triton.jit
def _load_query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, rows, dims, T, D):
    """q and dO rows (masked), lse in log2 units and delta for a block of query rows (T of them)."""
    row_ok = rows < T
    qm = row_ok[:, None] & (dims[None, :] < D)
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=qm, other=0.0)
    do = tl.load(do_ptr + base + rows[:, None] * D + dims[None, :], mask=qm, other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _dkdv_query_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, start_m, dims, cols, TQ, TK, D,
                      qk_scale, sm_scale, head_key, threshold, keep_scale, CAUSAL: tl.constexpr,
                      DROPOUT: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """dK, dV contributions of one block of query rows to this program's key block."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q, do, lse2, delta = _load_query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, rows, dims, TQ, D)
    z, ds = _recompute(q, k, v, do, lse2, delta, rows, cols, TQ, TK, qk_scale, sm_scale, head_key, threshold,
                       keep_scale, CAUSAL, DROPOUT, MASKED)
    dv += tl.dot(tl.trans(z.to(do.dtype)), do)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.autotune(configs=_autotune_configs("dkdv"), key=["TQ", "BLOCK_D", "CAUSAL", "DROPOUT"],
                 prune_configs_by=_prune("dkdv"))
@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr, TQ, TK, D,
                          qk_scale, sm_scale, threshold, keep_scale, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * TQ * D
    kv_base = bh.to(tl.int64) * TK * D
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < TK) & (dims[None, :] < D)
    k = tl.load(k_ptr + kv_base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    head_key = _head_key(seed_ptr, bh) if DROPOUT else 0
    off = TK - TQ
    # causal: query rows before start_n * BLOCK_N - off see none of these keys
    lo = (tl.maximum(start_n * BLOCK_N - off, 0) // BLOCK_M) * BLOCK_M if CAUSAL else 0
    # query blocks from `first_full` on see every key of this block (their first row is at or past its
    # last key); up to `last_full` they lie inside TQ. A ragged last key block is masked throughout.
    first_full = (tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M \
        if CAUSAL else 0
    last_full = (TQ // BLOCK_M) * BLOCK_M if start_n * BLOCK_N + BLOCK_N <= TK else 0
    mid = tl.maximum(tl.minimum(first_full, last_full), lo)
    end = tl.maximum(last_full, mid)
    for start_m in range(lo, mid, BLOCK_M):                          # the diagonal: masked
        dk, dv = _dkdv_query_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, start_m, dims, cols,
                                   TQ, TK, D, qk_scale, sm_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT,
                                   True, BLOCK_M)
    for start_m in range(mid, end, BLOCK_M):                         # below the diagonal: no mask
        dk, dv = _dkdv_query_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, start_m, dims, cols,
                                   TQ, TK, D, qk_scale, sm_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT,
                                   False, BLOCK_M)
    for start_m in range(end, TQ, BLOCK_M):                          # ragged last query rows: masked
        dk, dv = _dkdv_query_block(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, start_m, dims, cols,
                                   TQ, TK, D, qk_scale, sm_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT,
                                   True, BLOCK_M)
    tl.store(dk_ptr + kv_base + cols[:, None] * D + dims[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_base + cols[:, None] * D + dims[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_key_block(dq, q, do, lse2, delta, k_ptr, v_ptr, kv_base, rows, dims, start_n, TQ, TK, D, qk_scale, sm_scale,
                  head_key, threshold, keep_scale, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """dQ contribution of one key block to this program's query rows."""
    cols = start_n + tl.arange(0, BLOCK_N)
    kv_mask = ((cols[:, None] < TK) & (dims[None, :] < D)) if MASKED else (dims[None, :] < D)
    k = tl.load(k_ptr + kv_base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_base + cols[:, None] * D + dims[None, :], mask=kv_mask, other=0.0)
    _z, ds = _recompute(q, k, v, do, lse2, delta, rows, cols, TQ, TK, qk_scale, sm_scale, head_key, threshold,
                        keep_scale, CAUSAL, DROPOUT, MASKED)
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.autotune(configs=_autotune_configs("dq"), key=["TQ", "BLOCK_D", "CAUSAL", "DROPOUT"],
                 prune_configs_by=_prune("dq"))
@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr, TQ, TK, D,
                        qk_scale, sm_scale, threshold, keep_scale, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * TQ * D
    kv_base = bh.to(tl.int64) * TK * D
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q, do, lse2, delta = _load_query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, base, bh, rows, dims, TQ, D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    head_key = _head_key(seed_ptr, bh) if DROPOUT else 0
    full, hi = _visible_key_blocks(start_m, TK, TK - TQ, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full, BLOCK_N):                          # below the diagonal: no mask
        dq = _dq_key_block(dq, q, do, lse2, delta, k_ptr, v_ptr, kv_base, rows, dims, start_n, TQ, TK, D, qk_scale,
                           sm_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT, False, BLOCK_N)
    for start_n in range(full, hi, BLOCK_N):                         # the diagonal: masked
        dq = _dq_key_block(dq, q, do, lse2, delta, k_ptr, v_ptr, kv_base, rows, dims, start_n, TQ, TK, D, qk_scale,
                           sm_scale, head_key, threshold, keep_scale, CAUSAL, DROPOUT, True, BLOCK_N)
    qm = (rows[:, None] < TQ) & (dims[None, :] < D)
    tl.store(dq_ptr + base + rows[:, None] * D + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qm)


def _threshold(p: float) -> int:
    return int(p * 16777216.0)


def _check(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError(f"q: the Triton attention supports float32, float16 and bfloat16, got {q.dtype}")
    if not 16 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={q.shape[-1]} is unsupported by the Triton attention (16 to {MAX_HEAD_DIM})")


def _grid_m(T, BH):
    return lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), BH)


@torch.library.custom_op("gptfast_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  dropout_p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q)
    if interpreted_bf16(q):
        o, lse = attention_fwd(q.float(), k.float(), v.float(), causal, scale, dropout_p, seed)
        return o.to(q.dtype), lse
    q, k, v = q.contiguous(), *_kv_per_query_head(k, v, q.shape[1])
    B, H, T, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    _attn_fwd_kernel[_grid_m(T, B * H)](q, k, v, o, lse, seed.to(q.device), T, k.shape[2], D, scale * LOG2E,
                                        _threshold(dropout_p), 1.0 / (1.0 - dropout_p), CAUSAL=causal,
                                        DROPOUT=dropout_p > 0, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return o, lse


@torch.library.custom_op("gptfast_triton::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool, scale: float, dropout_p: float,
                  seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q)
    if interpreted_bf16(q):
        grads = attention_bwd(dout.float(), q.float(), k.float(), v.float(), o.float(), lse, causal, scale,
                              dropout_p, seed)
        return tuple(g.to(q.dtype) for g in grads)
    Hk = k.shape[1]
    q, dout, o = q.contiguous(), dout.contiguous(), o.contiguous()
    k, v = _kv_per_query_head(k, v, q.shape[1])
    B, H, T, D = q.shape
    delta = (dout.float() * o.float()).sum(-1).contiguous()          # (B, H, T): rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    seed = seed.to(q.device)
    Tk = k.shape[2]
    args = (T, Tk, D, scale * LOG2E, scale, _threshold(dropout_p), 1.0 / (1.0 - dropout_p))
    meta = dict(CAUSAL=causal, DROPOUT=dropout_p > 0, BLOCK_D=max(16, triton.next_power_of_2(D)))
    _attn_bwd_dkdv_kernel[lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), B * H)](
        q, k, v, dout, lse.contiguous(), delta, dk, dv, seed, *args, **meta)
    _attn_bwd_dq_kernel[_grid_m(T, B * H)](q, k, v, dout, lse.contiguous(), delta, dq, seed, *args, **meta)
    if Hk != H:                                                      # grouped-query: each K/V head's group summed
        dk, dv = (g.view(B, Hk, H // Hk, *g.shape[2:]).sum(2, dtype=torch.float32).to(g.dtype) for g in (dk, dv))
    return dq, dk, dv


def _kv_per_query_head(k: torch.Tensor, v: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query K/V (B, Hk, Tk, D) as one head per query head (H / Hk copies of each), for the Triton kernels,
    which take H K/V heads; the CPU and CUDA kernels read the shared head in place. A group loop in the dK/dV
    kernel pushed its tile configs past 255 registers on sm_80 (spills in .ci/triton_aot_check.py): reading in place
    here is the next version, to be measured on a GPU."""
    k, v = k.contiguous(), v.contiguous()
    if k.shape[1] == H:
        return k, v
    return k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // k.shape[1], dim=1)


def aot_specializations(full: bool) -> list[Specialization]:
    """Each kernel's tile classes (GPU_TILES) with every config of the class; dropout on (usually more registers)
    and, at bfloat16 head dim 64, also off - every forward config (evaluation and generation), the backward
    kernels' first (training with dropout 0). `full`: every dtype x head dim 64, 128 x dropout off/on."""
    variants = ([(dt, d, drop) for dt in TYPES for d in (64, 128) for drop in (False, True)] if full
                else [("bfloat16", 64, True), ("bfloat16", 64, False), ("bfloat16", 128, True),
                      ("float32", 64, True), ("float32", 128, True)])
    out = []
    for kernel, kind, extra in ((_attn_fwd_kernel, "fwd", {"o_ptr": "*{dt}", "lse_ptr": "*fp32"}),
                                (_attn_bwd_dkdv_kernel, "dkdv", {"dk_ptr": "*{dt}", "dv_ptr": "*{dt}"}),
                                (_attn_bwd_dq_kernel, "dq", {"dq_ptr": "*{dt}"})):
        for dt, d, drop in variants:
            tiles = gpu_tiles(kind, 4 if dt == "float32" else 2, d)
            if not full and not drop and kind != "fwd":
                tiles = tiles[:1]
            t = TYPES[dt]
            types = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "do_ptr": f"*{t}", "lse_ptr": "*fp32",
                     "delta_ptr": "*fp32", "seed_ptr": "*i64", "TQ": "i32", "TK": "i32", "D": "i32",
                     "qk_scale": "fp32", "sm_scale": "fp32", "threshold": "i32", "keep_scale": "fp32",
                     **{k: v.format(dt=t) for k, v in extra.items()}}
            for bm, bn, warps, stages in tiles:
                const = {"CAUSAL": True, "DROPOUT": drop, "BLOCK_D": d, "BLOCK_M": bm, "BLOCK_N": bn}
                out.append(Specialization(f"attn_{kind}", kernel, types, const, warps, stages, dot=True,
                                          label=f"{dt} D{d} drop{int(drop)} M{bm} N{bn} w{warps} s{stages}"))
    return out

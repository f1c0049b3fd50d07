"""Causal scaled dot-product attention, the heart of a transformer block.

    out = softmax(q k^T * scale + causal mask) v          q (B, nh, Tq, hs); k, v (B, nh, Tk, hs); scale 1/sqrt(hs)

with dropout on the attention weights in training. Kernels: csrc/cpu/attention_fwd.cpp, attention_bwd.cpp,
attention_decode.cpp; csrc/cuda/attention.cu (+ attention_tc.cu, tensor cores); ops/triton/attention.py. They
never form the (T, T) weights: a query's row runs over key tiles with the online softmax (a running max m, sum
l and output O, rescaled when m grows), saves its log-sum-exp, and the backward recomputes each weight from it
(P = exp(s - lse)) instead of storing them; dropout is a counter hash of (seed, head, query, key), regenerated
in the backward.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .checks import check_floating, check_like
from .dropout_rng import dropout_keep_mask
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, randn, register, seed_tensor, stat_dtype


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (B, nh, Tq, hs); k and v (B, n_kv, Tk, hs) with Tk >= Tq and n_kv dividing nh (grouped-query attention),
    all of q's dtype and device."""
    check_floating("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must have rank 4 (B, nh, T, hs), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_like(name, t, "q", q)
        if t.ndim != 4 or t.shape[0] != q.shape[0] or t.shape[3] != q.shape[3] or t.shape[1] < 1 \
                or q.shape[1] % t.shape[1]:
            raise ValueError(f"{name} must have shape (B, n_kv, Tk, hs) matching q's B, hs {tuple(q.shape)} with "
                             f"n_kv dividing q's {q.shape[1]} heads, got {tuple(t.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"k holds {k.shape[2]} positions, fewer than q's {q.shape[2]}: the queries must be the "
                         "last positions of the keys")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     scale: float | None = None, seed: torch.Tensor | int | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Causal scaled dot-product attention. q (B, nh, Tq, hs), k and v (B, n_kv, Tk, hs) -> (B, nh, Tq, hs).

    n_kv < nh is grouped-query attention (Llama, Qwen3): query head h reads K/V head h // (nh / n_kv); the
    kernels index the shared head, K and V are never repeated.

    Usually Tq == Tk. With a KV cache, Tk > Tq: the queries are the *last* Tq of the Tk positions
    (query row r sits at position r + Tk - Tq and sees keys 0 .. r + Tk - Tq).
    `scale` defaults to 1/sqrt(hs); `dropout_p` drops attention weights (pass 0.0 in eval mode).
    `seed` keys the shared counter-based dropout RNG (see dropout_rng.py): the same seed drops the
    same weights in `reference`, `extension` and `triton`. When None it is drawn from torch's RNG
    (so torch.manual_seed makes runs repeatable). The `torch` backend uses SDPA's own dropout.
    """
    check_attention_inputs(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        seed = seed_tensor(seed)
    return get_backend(backend).causal_attention(q, k, v, dropout_p, scale, seed)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              scale: float | None = None, seed=None, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, with dropout on the attention weights. (`causal=False`: no mask -
    the kernel ops take either; the interface is always causal.)

    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs) with Tk >= Tq - the queries are the last Tq
    positions (with a KV cache, the earlier keys come from the cache): the query at position t attends to
    positions <= t only. Dropout keeps weight (b*nh + h, t, s) iff the shared counter-based hash of
    (seed, b*nh + h, t, s) says so (t the query's position), and scales kept weights by 1 / (1 - dropout_p).
    """
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    if k.shape[1] != nh:                                         # grouped-query: each K/V head serves nh / n_kv
        k = k.repeat_interleave(nh // k.shape[1], dim=1)         # query heads (consecutive ones)
        v = v.repeat_interleave(nh // v.shape[1], dim=1)
    offset = Tk - Tq                                             # cached positions before the queries
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                   # (B, nh, Tq, Tk)
    if causal:
        future = torch.triu(torch.ones(Tq, Tk, dtype=torch.bool, device=q.device), diagonal=1 + offset)
        scores = scores.masked_fill(future, float("-inf"))       # no peeking at later tokens
    weights = torch.softmax(scores, dim=-1)                      # (B, nh, Tq, Tk), rows sum to 1
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed_tensor(seed), B * nh, Tk, Tk, dropout_p, device=q.device)[:, offset:]
        weights = weights * keep.view(B, nh, Tq, Tk) / (1.0 - dropout_p)
    return weights @ v                                           # (B, nh, Tq, hs)


def torch_twin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               scale: float | None = None, seed=None) -> torch.Tensor:
    """SDPA (flash / memory-efficient / math kernels, its pick); `seed` unused: SDPA's dropout draws from
    torch's own RNG, so with dropout this computes a different random function."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, **gqa)
    # fewer queries than keys (KV cache): SDPA's is_causal aligns the top-left corner, we need the
    # bottom-right one - query r sees keys 0 .. r + Tk - Tq - so pass the mask explicitly
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale, **gqa)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_fwd(q, k, v, causal, scale, dropout_p, seed):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:3], dtype=stat_dtype(q.dtype), device=q.device))


def _fake_bwd(dout, q, k, v, o, lse, causal, scale, dropout_p, seed):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _autograd(bwd):
    """Saves q, k, v, the output and its log-sum-exp (not the weights: the backward recomputes them)."""
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


with torch.inference_mode(False):      # this module may first load inside inference mode (generation),
    _NO_SEED = torch.zeros(1, dtype=torch.int64)   # and training saves the seed: a normal tensor. Read only when dropout_p > 0


def compiled(k, backend: str):
    def causal_attention(q, key, v, dropout_p=0.0, scale=None, seed=None):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return k.attention_fwd(q, key, v, True, scale, dropout_p, _NO_SEED if seed is None else seed)[0]
    return causal_attention


def table_key(q, k, v, dropout_p=0.0, *_):
    return "attention_dropout" if dropout_p > 0 else "attention"


# ----------------------------------------------------------------------------- cases
def _case(B: int, H: int, T: int, D: int, Tk: int | None = None, dropout: float = 0.0, view: str = "",
          small: bool = True, big: bool = False, found: str = "", kv_heads: int | None = None) -> Case:
    """q (B, H, T, D), k/v (B, H, Tk, D). `Tk` > T: a KV cache (queries are the last T positions). view
    "fused qkv": q, k, v are strided views of one (B, T, 3, H, D) tensor, as a fused QKV projection gives
    them; "cache slice": k and v are the first Tk positions of (B, H, Tk + 5, D) caches, as decoding reads
    them. `dropout` > 0: a fixed seed, so backends sharing the counter-based RNG drop the same weights as the
    reference and agree to rounding; any mask difference shows as an O(1) error."""
    Tk = Tk or T
    seed = torch.tensor([1234], dtype=torch.int64)

    def build(g):
        if view == "fused qkv":
            return {"qkv": randn(g, B, T, 3, H, D)}
        extra, Hk = 5 if view == "cache slice" else 0, kv_heads or H
        return {"q": randn(g, B, H, T, D), "k": randn(g, B, Hk, Tk + extra, D), "v": randn(g, B, Hk, Tk + extra, D)}

    def call(backend, t):
        if view == "fused qkv":
            q, k, v = t["qkv"].permute(2, 0, 3, 1, 4).unbind(0)     # each (B, H, T, D), non-contiguous
        else:
            q, k, v = t["q"], t["k"][:, :, :Tk], t["v"][:, :, :Tk]
        return causal_attention(q, k, v, dropout_p=dropout, seed=seed, backend=backend)
    label = f"B{B} H{H} T{T} D{D}" + (f" GQA {kv_heads} K/V heads" if kv_heads else "") + \
        (f" KV-cache Tk{Tk}" if Tk != T else "") + \
        (f" dropout {dropout:g}" if dropout else "") + (f" {view}" if view else "")
    return Case(label, build, call, small=small, big=big, random=dropout > 0.0, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case(1, 2, 1, 64), _case(2, 2, 7, 64), _case(1, 2, 129, 64, found="a partial last key tile"),
           _case(1, 1, 129, 16), _case(1, 1, 65, 80, found="head dim 80: no power of two"), _case(1, 1, 65, 128),
           _case(2, 3, 33, 32, view="fused qkv", found="strided q, k, v"), _case(2, 3, 48, 64, dropout=0.1),
           _case(1, 2, 1, 64, Tk=77), _case(1, 2, 7, 64, Tk=129, dropout=0.1),
           _case(2, 2, 1, 24, Tk=33, view="cache slice", found="k, v sliced out of a longer cache"),
           _case(2, 4, 70, 64, kv_heads=2, found="grouped-query: two query heads per K/V head"),
           _case(1, 8, 33, 32, kv_heads=1, dropout=0.1, found="grouped-query with one K/V head, dropout"),
           _case(2, 6, 1, 16, Tk=40, kv_heads=2, view="cache slice", found="grouped-query decoding from a cache"),
           _case(1, 4, 5, 80, Tk=21, kv_heads=2, found="grouped-query, a few new rows against a cache")]
    if not quick:
        out += [_case(1, 4, 1000, 64, small=False, big=True), _case(1, 2, 1000, 80, small=False, big=True),
                _case(1, 2, 257, 128, small=False, big=True), _case(2, 12, 1024, 64, small=False, big=True),
                _case(2, 12, 1024, 64, dropout=0.1, small=False, big=True),
                _case(1, 12, 64, 64, Tk=1000, small=False, big=True),
                _case(1, 16, 512, 128, kv_heads=8, small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    q = torch.randn(1, 2, 4, 8)
    return [BadInput(lambda: causal_attention(q[0], q[0], q[0]), ValueError, "q must have rank 4"),
            BadInput(lambda: causal_attention(q, q.double(), q), TypeError, "k has dtype torch.float64 but q has"),
            BadInput(lambda: causal_attention(q, q, q[:, :, :3]), ValueError, "v must have k's shape"),
            BadInput(lambda: causal_attention(torch.randn(1, 3, 4, 8), q, q), ValueError, "n_kv dividing q's 3 heads"),
            BadInput(lambda: causal_attention(q, q.to("meta"), q), ValueError, "k is on meta but q is on cpu"),
            BadInput(lambda: causal_attention(q, q, q, dropout_p=1.0), ValueError, "dropout_p"),
            BadInput(lambda: causal_attention(q.long(), q, q), TypeError, "q must be a floating-point tensor"),
            BadInput(lambda: causal_attention(q, q[:, :, :2], q[:, :, :2]), ValueError, "fewer than q's")]


BENCH_SEED = torch.tensor([1234], dtype=torch.int64)


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    shapes = [(2, 4, 128, 64)] if quick else [(2, 12, 256, 64), (8, 12, 256, 64), (2, 12, 1024, 64), (8, 12, 1024, 64)]
    sweep_t = [(1, 12, T, 64) for T in (128, 256, 512, 1024, 2048, 4096)] if sweep and not quick else []
    gqa = [] if quick else [(1, 16, 512, 128, 8), (4, 16, 512, 128, 8)]   # Qwen3-0.6B: 16 query, 8 K/V heads
    return {"attention": shapes + gqa + sweep_t, "attention_dropout": list(shapes)}


def bench(key: str, shape: tuple) -> Bench:
    """shape (B, H, T, D), or (B, H, T, D, n_kv) for grouped-query attention."""
    B, H, T, D = shape[:4]
    Hk = shape[4] if len(shape) > 4 else H
    p = 0.1 if key == "attention_dropout" else 0.0

    def work(dtype, mode):                     # QK^T and PV, causal half; the backward is 2.5x the forward
        return 4 * B * H * T * T * D * 0.5 * (3.5 if mode == "fwd+bwd" else 1)
    # training-shaped attention with dropout: the seed fixed, so backends sharing the counter-based RNG compute
    # the same function and their error stays meaningful
    return Bench(key, shape, lambda g: ([randn(g, B, H, T, D), randn(g, B, Hk, T, D), randn(g, B, Hk, T, D)], ()),
                 lambda q, k, v, backend: causal_attention(q, k, v, dropout_p=p, seed=BENCH_SEED, backend=backend),
                 work, "GFLOP/s", random=p > 0, peak_memory=key == "attention")


SDPA_PINNED = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}


def peers(name: str, key: str):
    """PyTorch's SDPA pinned to one of its kernels, flash-attn's (without dropout), and our CUDA attention on its
    plain (SIMT) kernels instead of the tensor-core ones (GPTFAST_CUDA_ATTENTION=simt)."""
    p = 0.1 if key == "attention_dropout" else 0.0
    if name in SDPA_PINNED and p == 0:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pinned(q, k, v):
            with sdpa_kernel(getattr(SDPBackend, SDPA_PINNED[name])):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return pinned
    if name == "flash-attn" and p == 0:
        from flash_attn import flash_attn_func   # (B, T, H, D) layout

        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               causal=True).transpose(1, 2)
    if name == "extension-simt":
        def simt(q, k, v):
            old = os.environ.get("GPTFAST_CUDA_ATTENTION")
            os.environ["GPTFAST_CUDA_ATTENTION"] = "simt"
            try:
                return causal_attention(q, k, v, dropout_p=p, seed=BENCH_SEED, backend="extension")
            finally:
                os.environ.pop("GPTFAST_CUDA_ATTENTION") if old is None else os.environ.update(GPTFAST_CUDA_ATTENTION=old)
        return simt
    return None


register(Op("causal_attention", causal_attention, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"attention_fwd": Kernel(_fake_fwd, _autograd, "attention_bwd"), "attention_bwd": Kernel(_fake_bwd)},
            compiled=compiled, table_keys=("attention", "attention_dropout"), table_key=table_key, peers=peers,
            drops_out=("attention_dropout",), triton_tf32=True, native_16bit=True,
            module=__name__))

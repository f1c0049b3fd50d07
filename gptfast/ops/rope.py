"""RoPE, rotary position embedding (Llama, Qwen3): each query and key vector rotated by angles that grow with its
position, so that q . k depends on the positions' difference alone.

    x1, x2 = x[..., :hs/2], x[..., hs/2:]                 the "rotate_half" layout (Hugging Face's)
    out = cat(x1 cos - x2 sin, x2 cos + x1 sin)          cos, sin of angle[t, i] = position_t * inv_freq_i

`rope(q, k, cos, sin)` rotates the queries (B, Hq, T, hs) and keys (B, Hk, T, hs) of one step in one call; cos
and sin (T, hs/2) are the angles of these T positions (`rope_angles`: start_pos onwards when decoding).
`rope_inv_freq` gives the frequencies: theta^(-2i/hs), with Llama 3's long-context scaling when asked.
Kernels: csrc/cpu/rope.cpp, csrc/cuda/rope.cu, ops/triton/rope.py: one pass reads each row and writes its rotation
(the textbook's rotate_half temporary, its cat and the two products' temporaries never exist); the backward is
the rotation by the opposite angle, so nothing is saved but the tables.
"""
from __future__ import annotations

import math

import torch

from .checks import check_floating, check_like
from .registry import get_backend
from .spec import BadInput, Bench, Case, Kernel, Op, element_size, randn, register


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated: q (B, Hq, T, hs), k (B, Hk, T, hs); cos and sin (T, hs / 2) on q's device, any floating
    dtype (the kernels compute in float32, or float64 for float64 q: keep the tables in float32 or better)."""
    check_floating("q", q)
    check_like("k", k, "q", q)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be (B, heads, T, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, hs = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, hs):
        raise ValueError(f"k must be (B={B}, heads, T={T}, head_dim={hs}) like q, got {tuple(k.shape)}")
    if hs % 2:
        raise ValueError(f"head_dim must be even (two halves rotate together), got {hs}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_floating(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.shape != (T, hs // 2):
            raise ValueError(f"{name} must have shape (T={T}, head_dim/2={hs // 2}), got {tuple(t.shape)}")
    return get_backend(backend).rope(q, k, cos, sin)


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """(head_dim / 2,) float64 frequencies theta^(-2i / head_dim). `scaling`: Llama 3's ("rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"): long wavelengths slowed by
    `factor`, short ones kept, the band between blended."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"rope scaling {scaling.get('rope_type')!r} is not supported (only Llama 3's)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > original / low, inv_freq / factor,
                       torch.where(wavelen < original / high, inv_freq, blended))


def rope_angles(inv_freq: torch.Tensor, start: int, T: int, dtype: torch.dtype, device=None):
    """(cos, sin), each (T, hs / 2) in `dtype`, for positions start .. start + T - 1 (computed in float64)."""
    pos = torch.arange(start, start + T, dtype=torch.float64, device=inv_freq.device)
    angles = pos[:, None] * inv_freq[None, :]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- the textbook and PyTorch's
def reference(q, k, cos, sin):
    """Each vector's two halves rotated by the position's angles: a 2-D rotation per frequency."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)                               # (B, H, T, hs/2) each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotate(q), rotate(k)


def torch_twin(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb: full-width tables (in q's dtype, as HF casts them) and rotate_half."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return q * cos2 + rotate_half(q) * sin2, k * cos2 + rotate_half(k) * sin2


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake(a, b, cos, sin):
    return (torch.empty(a.shape, dtype=a.dtype, device=a.device), torch.empty(b.shape, dtype=b.dtype, device=b.device))


def _autograd(bwd):
    """Saves the tables alone: the backward is the rotation by the opposite angle (no gradient for the tables)."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[2], inputs[3])
        ctx.set_materialize_grads(True)

    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = bwd(dq, dk, cos, sin)
        return dq_in, dk_in, None, None

    return setup, backward


def compiled(k_, backend: str):
    def rope(q, k, cos, sin):
        return k_.rope_fwd(q, k, cos, sin)
    return rope


# ----------------------------------------------------------------------------- cases
def _case(B: int, Hq: int, Hk: int, T: int, hs: int, view: str = "", start: int = 0, small: bool = True,
          big: bool = False, found: str = "") -> Case:
    """q (B, Hq, T, hs), k (B, Hk, T, hs), the angles of positions start.. (theta 1e6, Qwen3's). view "projected":
    q and k seen as the (B, T, H, hs) outputs of a projection transposed to (B, H, T, hs), as the model makes them;
    "strided tables": cos and sin every other row of longer tables."""
    inv_freq = rope_inv_freq(hs, 1e6)

    def build(g):
        shape = (lambda H: (B, T, H, hs)) if view == "projected" else (lambda H: (B, H, T, hs))
        return {"q": randn(g, *shape(Hq)), "k": randn(g, *shape(Hk))}

    cos, sin = rope_angles(inv_freq, start, 2 * T if view == "strided tables" else T, torch.float64)

    def call(backend, t):                                         # (the tables: float64, whatever q's dtype)
        q, k = (t["q"].transpose(1, 2), t["k"].transpose(1, 2)) if view == "projected" else (t["q"], t["k"])
        c, s = (t["cos"][::2], t["sin"][::2]) if view == "strided tables" else (t["cos"], t["sin"])
        qr, kr = rope(q, k, c, s, backend=backend)
        return torch.cat((qr.flatten(), kr.flatten()))
    label = f"B{B} Hq{Hq} Hk{Hk} T{T} D{hs}" + (f" from {start}" if start else "") + (f" {view}" if view else "")
    return Case(label, build, call, extra={"cos": cos, "sin": sin}, small=small, big=big, found=found)


def cases(quick: bool) -> list[Case]:
    out = [_case(2, 4, 2, 7, 64), _case(1, 16, 8, 129, 128, "projected", found="q and k as transposed projections"),
           _case(1, 2, 1, 1, 80, start=77, found="one decoding position far from 0; head_dim 80"),
           _case(2, 3, 3, 33, 16), _case(1, 2, 2, 9, 34, "strided tables", found="strided cos/sin; a half of 17")]
    if not quick:
        out += [_case(1, 16, 8, 1000, 128, "projected", small=False, big=True)]
    return out


def bad_inputs() -> list[BadInput]:
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    c = torch.randn(5, 4)
    return [BadInput(lambda: rope(q, k, c[:3], c), ValueError, r"cos must have shape \(T=5, head_dim/2=4\)"),
            BadInput(lambda: rope(q, k[..., :6], c, c), ValueError, r"k must be \(B=1, heads, T=5, head_dim=8\)"),
            BadInput(lambda: rope(q[..., :7], k[..., :7], c, c), ValueError, "head_dim must be even"),
            BadInput(lambda: rope(q, k, c, c.long()), TypeError, "sin must be a floating-point tensor"),
            BadInput(lambda: rope(q, k, c.to("meta"), c), ValueError, "cos is on meta but q is on cpu"),
            BadInput(lambda: rope(q[0], k[0], c, c), ValueError, r"q and k must be \(B, heads, T, head_dim\)"),
            BadInput(lambda: rope(q.long(), k.long(), c, c), TypeError, "q must be a floating-point tensor")]


def bench_shapes(device_type: str, quick: bool, sweep: bool) -> dict:
    if quick:
        return {"rope": [(1, 16, 8, 64, 128)]}
    return {"rope": [(4, 16, 8, 512, 128), (1, 16, 8, 2048, 128)]}     # Qwen3-0.6B's heads at B4 x T512, B1 x T2048


def bench(key: str, shape: tuple) -> Bench:
    B, Hq, Hk, T, hs = shape
    cos, sin = rope_angles(rope_inv_freq(hs, 1e6), 0, T, torch.float64)

    def work(dtype, mode):            # read q and k, write them rotated; the backward the same again
        return B * (Hq + Hk) * T * hs * element_size(dtype) * (4 if mode == "fwd+bwd" else 2)

    def call(q, k, backend):
        qr, kr = rope(q, k, cos.to(q.device, torch.float32), sin.to(q.device, torch.float32), backend=backend)
        return torch.cat((qr.flatten(), kr.flatten()))
    return Bench(key, shape, lambda g: ([randn(g, B, Hq, T, hs), randn(g, B, Hk, T, hs)], ()), call, work)


def _rowwise(backend: str, x: torch.Tensor) -> torch.Tensor:
    """Each row of x (rows, C) as one head's vector at position 5 (C even)."""
    if x.shape[-1] % 2:
        x = x[..., :-1]
    cos, sin = rope_angles(rope_inv_freq(x.shape[-1], 1e4), 5, 1, torch.float32, x.device)
    q = x[None, :, None, :]                                       # (1, rows, 1, C): a head per row
    return rope(q, q[:, :1], cos, sin, backend=backend)[0][0, :, 0, :]


register(Op("rope", rope, reference, torch_twin, cases, bad_inputs, bench_shapes, bench,
            kernels={"rope_fwd": Kernel(_fake, _autograd, "rope_bwd"), "rope_bwd": Kernel(_fake)},
            compiled=compiled, rowwise=_rowwise, native_16bit=True, module=__name__))

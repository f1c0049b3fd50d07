"""A whole Llama/Qwen3 block's decoding step as one op: `decode_block_llama`.

decode_block.py's idea for the family of model/llama.py: one block op by op is ~14 calls (RMSNorm, three
projections, Qwen3's q/k norms, RoPE, the cache writes, attention, the output projection, the residual add,
RMSNorm, gate, up, SwiGLU, down, the add) - ~400 calls a token for Qwen3-0.6B's 28 blocks, each paying Python,
the dispatcher and a wake-up of the threads. `extension` on CPU (csrc/cpu/decode_block_llama.cpp) runs the
block in one call whose threads meet at barriers; each step is the standalone kernel's own loop on a thread's
share, so it computes exactly what the ops one by one compute (bit-for-bit on `extension`, tested). The model
takes this path by itself when decoding one new position with a KV cache (`KVCache.run_block`).

The math (`reference` below is the twin the kernel is tested against), x (B, 1, C), group = n_heads / n_kv_heads:
    q, k, v = q(h), k(h), v(h) with h = rms(x)         q and k: (Qwen3) RMS-normalized per head, then rotated
    x1 = x + out(attention(q, k_cache[:, :, :p+1], v_cache[:, :, :p+1]))   k and v written at position p;
                                                                      query head i reads K/V head i // group
    y  = x1 + down(silu(gate(h2)) * up(h2))            with h2 = rms(x1)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .attention import reference as attention_reference
from .decode_block import (MAX_BATCH, WEIGHT_DTYPES, LinearWeights, check_int8_activations, check_layer, layer_float64,
                           layer_output)
from .linear import weights_of_kind
from .registry import BackendError, get_backend, resolve_backend_name
from .rms_norm import reference as rms_norm_reference
from .rope import reference as rope_reference
from .spec import BadInput, Case, Kernel, Op, randn, register
from .swiglu import reference as swiglu_reference


class LlamaBlockWeights(NamedTuple):
    """One Llama/Qwen3 block: RMSNorm weights norm1, norm2 (C,); projections q (n_heads * head_dim, C), k and v
    (n_kv_heads * head_dim, C), out (C, n_heads * head_dim), gate and up (F, C), down (C, F); Qwen3's per-head
    q_norm, k_norm (head_dim,) or None; every RMSNorm's eps; `int8_activations`: every layer int8 and each layer's
    input rows quantized to int8 as `linear_w8a8` does (quantize(model, "w8a8"))."""
    norm1: torch.Tensor
    q: LinearWeights
    k: LinearWeights
    v: LinearWeights
    out: LinearWeights
    norm2: torch.Tensor
    gate: LinearWeights
    up: LinearWeights
    down: LinearWeights
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    eps: float = 1e-6
    int8_activations: bool = False

    def layers(self) -> tuple[LinearWeights, ...]:
        """The seven linear layers in the kernel's order."""
        return (self.q, self.k, self.v, self.out, self.gate, self.up, self.down)


LAYER_NAMES = ("q", "k", "v", "out", "gate", "up", "down")


def check_decode_block_llama(x, weights: LlamaBlockWeights, k_cache, v_cache, start_pos: int, cos, sin) -> None:
    """Every argument, named when it is wrong: x (B, 1, C) float32; the float32 RMSNorm weights; the seven layers'
    weights (N, K) float32/bfloat16/int8 (int8 with float32 scales (N,)), biases float32 (N,) or None; the caches
    float32 (B, n_kv_heads, context, head_dim) with n_kv_heads dividing n_heads; cos, sin float32 (1, head_dim / 2);
    0 <= start_pos < context."""
    if x.ndim != 3 or x.shape[1] != 1:
        raise ValueError(f"x must have shape (B, 1, C) - one new position per sequence - got {tuple(x.shape)}")
    B, _, C = x.shape
    if x.dtype != torch.float32:
        raise TypeError(f"x: the decoding block takes float32 activations, got {x.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32 or t.ndim != 4 or t.shape[0] != B or t.shape[3] % 2 or t.device != x.device:
            raise ValueError(f"{name} must be a float32 ({B}, n_kv_heads, context, head_dim) tensor with an even "
                             f"head_dim on x's device, got {t.dtype} {tuple(t.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    Nq, F = weights.q.weight.shape[0], weights.gate.weight.shape[0]
    if Nq % D or (Nq // D) % Hkv:
        raise ValueError(f"q weight must have n_heads * head_dim rows with n_heads a multiple of the cache's "
                         f"n_kv_heads = {Hkv}, got {Nq} rows for head_dim {D}")
    shapes = [(Nq, C), (Hkv * D, C), (Hkv * D, C), (C, Nq), (F, C), (F, C), (C, F)]
    for name, L, (N, K) in zip(LAYER_NAMES, weights.layers(), shapes):
        check_layer(name, L, N, K, x.device)
    if (weights.q_norm is None) != (weights.k_norm is None):
        raise ValueError("q_norm and k_norm: both (Qwen3) or neither")
    for name, t, n in (("norm1", weights.norm1, C), ("norm2", weights.norm2, C), ("q_norm", weights.q_norm, D),
                       ("k_norm", weights.k_norm, D), ("cos", cos, D // 2), ("sin", sin, D // 2)):
        want = (1, n) if name in ("cos", "sin") else (n,)
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != want or t.device != x.device):
            raise ValueError(f"{name} must be a float32 {want} tensor on x's device, got {t.dtype} {tuple(t.shape)}")
    if not 0 <= start_pos < k_cache.shape[2]:
        raise ValueError(f"start_pos must be in [0, {k_cache.shape[2]}) (the cache's context), got {start_pos}")
    check_int8_activations(weights.int8_activations, zip(LAYER_NAMES, weights.layers()))


def fuses_decode_block_llama(x: torch.Tensor, weights: LlamaBlockWeights, k_cache: torch.Tensor,
                             backend: str | None = None) -> bool:
    """Whether `backend` runs `decode_block_llama` for these inputs as one fused kernel (plain Python checks, so
    torch.compile traces through it). `auto` fuses where it picks the extension's linear kernel for the weights'
    storage type, as for GPT-2's block."""
    name = resolve_backend_name(backend)
    if name == "auto":
        name = get_backend("auto").choice_for("decode_block_llama", x, weights)
    if name != "extension" or x.device.type != "cpu" or x.dtype != torch.float32 or k_cache.dtype != torch.float32 \
            or not k_cache.is_contiguous() or not 1 <= x.shape[0] <= MAX_BATCH:
        return False
    from . import extension
    return extension.compiled_for("cpu") and all(
        type(L.weight) in (torch.Tensor, torch.nn.Parameter) and L.weight.dtype in WEIGHT_DTYPES
        for L in weights.layers())


def decode_block_llama(x: torch.Tensor, weights: LlamaBlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       start_pos: int, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """One Llama/Qwen3 block's step for one new position per sequence: x (B, 1, C) -> (B, 1, C), writing the new
    keys and values into k_cache, v_cache (B, n_kv_heads, context, head_dim) at `start_pos` and attending over
    positions 0..start_pos; cos, sin (1, head_dim / 2): that position's angles (ops.rope_angles). Inference only.
    Raises BackendError where `backend` has no fused block for these inputs (`reference` computes it with the
    textbook twin); the model then runs the block op by op."""
    check_decode_block_llama(x, weights, k_cache, v_cache, start_pos, cos, sin)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights.norm1, weights.out.weight)):
        raise RuntimeError("decode_block_llama is for inference (no backward): run it under torch.no_grad()")
    name = resolve_backend_name(backend)
    if name != "reference" and not fuses_decode_block_llama(x, weights, k_cache, name):
        raise BackendError(f"backend {name!r} has no fused Llama decoding block for x {x.dtype} on {x.device} with "
                           f"{weights.q.weight.dtype} weights")
    return get_backend(name).decode_block_llama(x, weights, k_cache, v_cache, start_pos, cos, sin)


# ----------------------------------------------------------------------------- the textbook
def reference(x, weights: LlamaBlockWeights, k_cache, v_cache, start_pos: int, cos, sin) -> torch.Tensor:
    """One Llama/Qwen3 block for one new position per sequence (x (B, 1, C)) with a KV cache, op by op."""
    w = weights
    q8 = w.int8_activations
    B, _, C = x.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    Hq = w.q.weight.shape[0] // D
    h = rms_norm_reference(x, w.norm1.to(x.dtype), w.eps)
    q = layer_output(h, w.q, q8).view(B, 1, Hq, D)
    k = layer_output(h, w.k, q8).view(B, 1, Hkv, D)
    v = layer_output(h, w.v, q8).view(B, 1, Hkv, D)
    if w.q_norm is not None:                                     # Qwen3: each head's q and k to unit RMS
        q, k = rms_norm_reference(q, w.q_norm.to(x.dtype), w.eps), rms_norm_reference(k, w.k_norm.to(x.dtype), w.eps)
    q, k = rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos, sin)   # (B, heads, 1, D)
    k_cache[:, :, start_pos] = k[:, :, 0]
    v_cache[:, :, start_pos] = v[:, 0]
    a = attention_reference(q, k_cache[:, :, :start_pos + 1], v_cache[:, :, :start_pos + 1])   # (B, Hq, 1, D)
    x1 = x + layer_output(a.transpose(1, 2).reshape(B, 1, Hq * D), w.out, q8)
    h2 = rms_norm_reference(x1, w.norm2.to(x.dtype), w.eps)
    return x1 + layer_output(swiglu_reference(layer_output(h2, w.gate, q8), layer_output(h2, w.up, q8)), w.down, q8)


# ----------------------------------------------------------------------------- the compiled kernel's contract
def _fake(x, norms, weights, scales, biases, k_cache, v_cache, cos, sin, start_pos, eps, int8_activations=False):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def kernel_args(x, weights: LlamaBlockWeights, k_cache, v_cache, start_pos: int, cos, sin) -> tuple:
    """The kernel's arguments in its one fixed order: x, [norm1, norm2 (, q_norm, k_norm)], the seven layers'
    [weights], [scales], [biases] (q, k, v, out, gate, up, down), the caches, cos, sin, start_pos, eps,
    int8_activations."""
    w = weights
    norms = [w.norm1, w.norm2] + ([w.q_norm, w.k_norm] if w.q_norm is not None else [])
    layers = w.layers()
    return (x.contiguous(), norms, [L.weight for L in layers], [L.scales for L in layers], [L.bias for L in layers],
            k_cache, v_cache, cos.contiguous(), sin.contiguous(), start_pos, w.eps, w.int8_activations)


def compiled(k, backend: str):
    def decode_block_llama(x, weights, k_cache, v_cache, start_pos, cos, sin):
        return k.decode_block_llama(*kernel_args(x, weights, k_cache, v_cache, start_pos, cos, sin))
    return decode_block_llama


def table_key(x, weights, *_):
    """The fused block runs the linear kernel of the backend picked for its linear layers (most of its time)."""
    return {torch.int8: "linear_int8", torch.bfloat16: "linear_bf16"}.get(weights.q.weight.dtype, "linear")


def to_float64(w: LlamaBlockWeights) -> LlamaBlockWeights:
    """The block for the float64 twin: int8 weights stay int8 (dequantized in float64), the rest widened."""
    d = lambda t: None if t is None else t.double()   # noqa: E731
    return LlamaBlockWeights(d(w.norm1), *map(layer_float64, w.layers()[:4]), d(w.norm2),
                             *map(layer_float64, w.layers()[4:]), d(w.q_norm), d(w.k_norm), w.eps, w.int8_activations)


# ----------------------------------------------------------------------------- cases
def _case(kind: str, B: int, Hq: int, Hkv: int, D: int, F: int, context: int, start_pos: int, qk_norm: bool,
          C: int | None = None, strided: bool = False, found: str = "") -> Case:
    """A block with weights of storage `kind` (float32 leaves follow the run's dtype; int8/bf16 weights kept as
    stored), random earlier cache rows (not zeros), the new position at `start_pos`; `strided`: x every other
    element of a wider tensor."""
    C = C or Hq * D
    shapes = [(Hq * D, C), (Hkv * D, C), (Hkv * D, C), (C, Hq * D), (F, C), (F, C), (C, F)]
    g0 = torch.Generator().manual_seed(B * 100 + D)
    stored = [weights_of_kind(kind, randn(g0, N, K, scale=K ** -0.5)) if kind != "float32" else (None, None)
              for N, K in shapes]
    angles = torch.arange(D // 2, dtype=torch.float64)[None] * 0.37 * (start_pos + 1) / D

    def build(g):
        leaves = {"x": randn(g, B, 1, 2 * C if strided else C), "k_cache": randn(g, B, Hkv, context, D),
                  "v_cache": randn(g, B, Hkv, context, D),
                  "norms": torch.cat([1 + randn(g, C, scale=0.1)] * 2 + [1 + randn(g, D, scale=0.1)] * 2)}
        for i, (N, K) in enumerate(shapes):
            if kind == "float32":
                leaves[f"weight{i}"] = randn(g, N, K, scale=K ** -0.5)
        return leaves

    def call(backend, t):
        layers = [LinearWeights(t[f"weight{i}"] if kind == "float32" else t[f"stored{i}"], t.get(f"scales{i}"))
                  for i in range(7)]
        n = t["norms"]
        qk = (n[2 * C:2 * C + D], n[2 * C + D:]) if qk_norm else (None, None)
        w = LlamaBlockWeights(n[:C], *layers[:4], n[C:2 * C], *layers[4:], *qk)
        k_cache, v_cache = t["k_cache"].clone(), t["v_cache"].clone()
        x = t["x"][..., ::2] if strided else t["x"]
        cos, sin = (f(angles).to(x.dtype) for f in (torch.cos, torch.sin))
        if x.dtype == torch.float64:                 # the textbook twin, in float64 throughout
            return reference(x, to_float64(w), k_cache, v_cache, start_pos, cos, sin)
        return decode_block_llama(x, w, k_cache, v_cache, start_pos, cos, sin, backend=backend)
    extra = {}
    for i, (w, s) in enumerate(stored):
        if w is not None:
            extra[f"stored{i}"] = w
        if s is not None:
            extra[f"scales{i}"] = s
    label = f"B{B} Hq{Hq} Hkv{Hkv} D{D} C{C} F{F} context {context} at {start_pos} {kind}" + \
        (" q/k norm" if qk_norm else "") + (" strided x" if strided else "")
    return Case(label, build, call, extra=extra, found=found)


def cases(quick: bool) -> list[Case]:
    return [_case("float32", 1, 4, 2, 80, 200, 8, 0, True, found="head dim 80, the first position, Qwen3's q/k norm"),
            _case("int8", 3, 6, 2, 16, 100, 130, 129, False, found="a cache one short of full; F off the vector"),
            _case("bf16", 2, 3, 1, 22, 70, 5, 3, True, C=33, found="C = 33 != n_heads * head_dim; a 22-wide head"),
            _case("int8", 16, 2, 2, 32, 128, 9, 4, True, strided=True, found="the largest batch the kernel takes; no grouping")]


def bad_inputs() -> list[BadInput]:
    C, Hq, Hkv, D, F = 32, 4, 2, 8, 48
    layer = lambda N, K: LinearWeights(torch.randn(N, K))   # noqa: E731
    w = LlamaBlockWeights(torch.ones(C), layer(Hq * D, C), layer(Hkv * D, C), layer(Hkv * D, C), layer(C, Hq * D),
                          torch.ones(C), layer(F, C), layer(F, C), layer(C, F), torch.ones(D), torch.ones(D))
    x, k, cs = torch.randn(2, 1, C), torch.randn(2, Hkv, 6, D), torch.ones(1, D // 2)
    run = lambda **kw: decode_block_llama(**{"x": x, "weights": w, "k_cache": k, "v_cache": k.clone(),  # noqa: E731
                                             "start_pos": 2, "cos": cs, "sin": cs, "backend": "extension", **kw})
    q8 = LinearWeights(torch.ones(Hq * D, C, dtype=torch.int8))
    return [BadInput(lambda: run(x=x.double()), TypeError, "x: the decoding block takes float32"),
            BadInput(lambda: run(x=torch.randn(2, 2, C)), ValueError, r"x must have shape \(B, 1, C\)"),
            BadInput(lambda: run(k_cache=torch.randn(2, 3, 6, D), v_cache=torch.randn(2, 3, 6, D)), ValueError,
                     "n_heads a multiple of the cache's n_kv_heads = 3"),
            BadInput(lambda: run(v_cache=torch.randn(2, Hkv, 5, D)), ValueError, "v_cache must have k_cache's shape"),
            BadInput(lambda: run(start_pos=6), ValueError, r"start_pos must be in \[0, 6\)"),
            BadInput(lambda: run(weights=w._replace(q=q8)), ValueError, "q weight is int8 and needs scales"),
            BadInput(lambda: run(weights=w._replace(up=layer(F, 16))), ValueError, r"up weight must have shape"),
            BadInput(lambda: run(weights=w._replace(down=w.down._replace(bias=torch.zeros(5)))), ValueError,
                     "down bias must be a float32"),
            BadInput(lambda: run(weights=w._replace(k_norm=None)), ValueError, "q_norm and k_norm: both"),
            BadInput(lambda: run(weights=w._replace(norm2=torch.ones(31))), ValueError, "norm2 must be"),
            BadInput(lambda: run(sin=torch.ones(1, D)), ValueError, r"sin must be a float32 \(1, 4\)"),
            BadInput(lambda: run(x=torch.randn(17, 1, C), k_cache=torch.randn(17, Hkv, 6, D),
                                 v_cache=torch.randn(17, Hkv, 6, D)), BackendError, "no fused Llama decoding block"),
            BadInput(lambda: run(backend="torch"), BackendError, "'torch' has no fused Llama decoding block")]


register(Op("decode_block_llama", decode_block_llama, reference, None, cases, bad_inputs,
            kernels={"decode_block_llama": Kernel(_fake)}, compiled=compiled,
            table_keys=("linear", "linear_int8", "linear_bf16"), table_key=table_key, inference_only=True,
            backends=("reference", "extension"), dtypes=("float32",), module=__name__))

"""A whole transformer block's decoding step as one op: `decode_block`.

Decoding one token calls ~12 ops per block (two LayerNorms, the Q/K/V, output and feed-forward linear
layers, the cache writes, attention, GELU, two residual adds): ~250 calls a token for GPT-2 124M, each
paying Python, the dispatcher and a wake-up of the threads - about as long as reading the token's int8
weights. A backend with a fused block (`extension` on CPU: csrc/cpu/decode_block.cpp) runs the block in
one call whose threads meet at barriers instead; each step there is the standalone kernel's own loop on a
thread's share of the work, so it computes exactly what the ops one by one compute (bit-for-bit on the
`extension` backend, tested). The model takes this path by itself when decoding one new position with a KV
cache (`KVCache.run_block`, gptfast/model/kv_cache.py); other backends keep the op-by-op path.

The math (`reference` below is the twin the kernel is tested against), x (B, 1, C):
    x1 = x + out(attention(q, k_cache[:, :, :p+1], v_cache[:, :, :p+1]))   with q, k, v = qkv(ln1(x)),
    y  = x1 + proj(gelu(fc(ln2(x1))))                                     k and v written at position p
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# (from-imports of the op modules' names: `gptfast.ops.layer_norm` itself is the function, not its module)
from .attention import reference as attention_reference
from .gelu import reference as gelu_reference
from .layer_norm import reference as layer_norm_reference
from .linear import reference as linear_reference, reference_int8 as linear_int8_reference, weights_of_kind
from .linear_int4 import padded_k, reference as linear_int4_reference
from .linear_w8a8 import reference as linear_w8a8_reference
from .registry import BackendError, get_backend, resolve_backend_name
from .spec import BadInput, Case, Kernel, Op, randn, register

MAX_BATCH = 16              # sequences the fused block takes: the linear kernel's few-rows range (linear.cpp)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)   # uint8: 4-bit (ops/linear_int4.py)


class LinearWeights(NamedTuple):
    """A linear layer as the fused ops read it: weight (N, K) float32, bfloat16 or int8; scales (N,)
    float32 for int8 (per output row); or 4-bit weights packed (N, Kp / 2) uint8 with scales (N, groups)
    (ops/linear_int4.py, int8 activations only); bias (N,) or None."""
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    bias: torch.Tensor | None = None


class BlockWeights(NamedTuple):
    """One pre-LN transformer block. `qkv`: one stacked (3C, C) layer (rows Q, K, V, as quantized models
    keep them) or three (C, C) ones; `fc` (4C, C) and `proj` (C, 4C) the feed-forward; both LayerNorms
    use `eps`. `int8_activations`: every layer int8 and each layer's input rows quantized to int8 as
    `linear_w8a8` does (quantize(model, "w8a8"))."""
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    qkv: tuple[LinearWeights, ...]
    out: LinearWeights
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    fc: LinearWeights
    proj: LinearWeights
    eps: float = 1e-5
    int8_activations: bool = False

    def layers(self) -> tuple[LinearWeights, ...]:
        """The six linear layers in the kernel's order: q, k, v, out, fc, proj. A stacked Q/K/V layer is split
        into its three row blocks - views, no copy - so every kernel sees Q, K and V one way."""
        qkv = self.qkv
        if len(qkv) == 1:
            C = qkv[0].weight.shape[0] // 3
            part = lambda t, i: None if t is None else t[i * C:(i + 1) * C]   # noqa: E731
            qkv = tuple(LinearWeights(part(qkv[0].weight, i), part(qkv[0].scales, i), part(qkv[0].bias, i))
                        for i in range(3))
        return (*qkv, self.out, self.fc, self.proj)


LAYER_NAMES = ("q", "k", "v", "out", "fc", "proj")


def check_decode_block(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       start_pos: int) -> None:
    """Every argument, named when it is wrong: x (B, 1, C) float32; the block's float32 LayerNorms (C,); its six
    layers' weights (N, K) float32/bfloat16/int8 (int8 with float32 scales (N,)), biases float32 (N,) or None;
    the caches float32 (B, n_heads, context, head_dim), n_heads * head_dim = C; 0 <= start_pos < context."""
    if x.ndim != 3 or x.shape[1] != 1:
        raise ValueError(f"x must have shape (B, 1, C) - one new position per sequence - got {tuple(x.shape)}")
    B, _, C = x.shape
    if x.dtype != torch.float32:
        raise TypeError(f"x: the decoding block takes float32 activations, got {x.dtype}")
    for name, t in (("ln1_weight", weights.ln1_weight), ("ln1_bias", weights.ln1_bias),
                    ("ln2_weight", weights.ln2_weight), ("ln2_bias", weights.ln2_bias)):
        if t.dtype != torch.float32 or t.shape != (C,) or t.device != x.device:
            raise ValueError(f"{name} must be a float32 ({C},) tensor on x's device, got {t.dtype} {tuple(t.shape)}")
    if len(weights.qkv) not in (1, 3):
        raise ValueError(f"qkv: one stacked (3C, C) layer or three (C, C) ones, got {len(weights.qkv)}")
    if len(weights.qkv) == 1 and weights.qkv[0].weight.shape[0] != 3 * C:
        raise ValueError(f"qkv: a stacked layer must have 3C = {3 * C} rows, got {weights.qkv[0].weight.shape[0]}")
    F = weights.fc.weight.shape[0]
    for name, L, (N, K) in zip(LAYER_NAMES, weights.layers(), [(C, C)] * 4 + [(F, C), (C, F)]):
        check_layer(name, L, N, K, x.device)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != torch.float32 or t.ndim != 4 or t.shape[0] != B or t.shape[1] * t.shape[3] != C \
                or t.device != x.device:
            raise ValueError(f"{name} must be a float32 ({B}, n_heads, context, head_dim) tensor with n_heads * "
                             f"head_dim = C = {C} on x's device, got {t.dtype} {tuple(t.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if not 0 <= start_pos < k_cache.shape[2]:
        raise ValueError(f"start_pos must be in [0, {k_cache.shape[2]}) (the cache's context), got {start_pos}")
    check_int8_activations(weights.int8_activations, zip(LAYER_NAMES, weights.layers()))


def check_layer(name: str, L: LinearWeights, N: int, K: int, device) -> None:
    """Layer `name` of (N, K) as the fused steps take it, named when wrong: float32/bfloat16/int8 (N, K) weights
    (int8 with float32 scales (N,)) or 4-bit packed uint8 (N, Kp / 2) with scales (N, Kp / 32 or Kp / 64); a float32
    bias (N,) or None."""
    four = L.weight.dtype == torch.uint8
    shape = (N, padded_k(K) // 2) if four else (N, K)
    if L.weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} weight must be float32, bfloat16, int8 or 4-bit (uint8), got {L.weight.dtype}")
    if tuple(L.weight.shape) != shape or L.weight.device != device:
        raise ValueError(f"{name} weight must have shape {shape} on x's device, got {tuple(L.weight.shape)}")
    if L.weight.dtype in (torch.int8, torch.uint8) and L.scales is None:
        raise ValueError(f"{name} weight is {'4-bit' if four else 'int8'} and needs scales")
    scale_shapes = ((N, padded_k(K) // 32), (N, padded_k(K) // 64)) if four else ((N,),)
    for what, t, shapes in (("scales", L.scales, scale_shapes), ("bias", L.bias, ((N,),))):
        if t is not None and (t.dtype != torch.float32 or not any(tuple(t.shape) == sh for sh in shapes)
                              or t.device != device):
            raise ValueError(f"{name} {what} must be a float32 {' or '.join(map(str, shapes))} tensor on x's device, "
                             f"got {t.dtype} {tuple(t.shape)}")


def check_int8_activations(on: bool, named_layers) -> None:
    """int8 activations are multiplied with int8 (linear_w8a8) or 4-bit (linear_int4) weights; 4-bit weights need
    them."""
    for name, L in named_layers:
        if on and L.weight.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"int8_activations needs int8 or 4-bit weights: {name} weight is {L.weight.dtype}")
        if not on and L.weight.dtype == torch.uint8:
            raise ValueError(f"{name} weight is 4-bit: it needs int8_activations")


def fuses_decode_block(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor,
                       backend: str | None = None) -> bool:
    """Whether `backend` runs `decode_block` for these inputs as one fused kernel (plain Python checks
    of dtypes, devices and shapes, so torch.compile traces through it). `auto` fuses where it picks the
    extension's linear kernel for the weights' storage type (most of the block's time)."""
    name = resolve_backend_name(backend)
    if name == "auto":
        name = get_backend("auto").choice_for("decode_block", x, weights)
    return name == "extension" and _extension_takes(x, weights, k_cache)


def _extension_takes(x, weights, k_cache) -> bool:
    """csrc/cpu/decode_block.cpp: float32 activations and cache on CPU, 1 to MAX_BATCH sequences, float32,
    bfloat16 or int8 weights (plain tensors: not FSDP's DTensors)."""
    from . import extension
    if x.device.type != "cpu" or x.dtype != torch.float32 or k_cache.dtype != torch.float32 \
            or not k_cache.is_contiguous() or not 1 <= x.shape[0] <= MAX_BATCH or not extension.compiled_for("cpu"):
        return False
    return all(type(L.weight) in (torch.Tensor, torch.nn.Parameter) and L.weight.dtype in WEIGHT_DTYPES
               for L in (*weights.qkv, weights.out, weights.fc, weights.proj))


def decode_block(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 start_pos: int, backend: str | None = None) -> torch.Tensor:
    """One block's step for one new position per sequence: x (B, 1, C) -> (B, 1, C), writing the new keys
    and values into k_cache, v_cache (B, n_heads, context, head_dim) at `start_pos` and attending over
    positions 0..start_pos. Inference only. Raises BackendError where `backend` has no fused block for
    these inputs (see fuses_decode_block; `reference` computes it with the textbook twin); the model then runs
    the block op by op."""
    check_decode_block(x, weights, k_cache, v_cache, start_pos)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights.ln1_weight, weights.out.weight)):
        raise RuntimeError("decode_block is for inference (no backward): run it under torch.no_grad()")
    name = resolve_backend_name(backend)
    if name != "reference" and not fuses_decode_block(x, weights, k_cache, name):
        raise BackendError(f"backend {name!r} has no fused decoding block for x {x.dtype} on {x.device} with "
                           f"{weights.qkv[0].weight.dtype} weights")
    return get_backend(name).decode_block(x, weights, k_cache, v_cache, start_pos)


# ----------------------------------------------------------------------------- the textbook
def layer_output(x: torch.Tensor, layer: LinearWeights, int8_activations: bool = False) -> torch.Tensor:
    """x @ W^T [+ b] for a layer of any storage type, in x's precision (int8_activations: x's rows quantized to int8
    first, linear_w8a8's twin)."""
    if layer.weight.dtype == torch.uint8:
        return linear_int4_reference(x, layer.weight, layer.scales, layer.bias)
    if int8_activations:
        return linear_w8a8_reference(x, layer.weight, layer.scales, layer.bias)
    if layer.weight.dtype == torch.int8:
        return linear_int8_reference(x, layer.weight, layer.scales, layer.bias)
    return linear_reference(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def reference(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
              start_pos: int) -> torch.Tensor:
    """One pre-LN block for one new position per sequence (x (B, 1, C)) with a KV cache, op by op."""
    w = weights
    B, _, C = x.shape
    H, D = k_cache.shape[1], k_cache.shape[3]
    q_w, k_w, v_w, out_w, fc_w, proj_w = w.layers()
    q8 = w.int8_activations
    h = layer_norm_reference(x, w.ln1_weight.to(x.dtype), w.ln1_bias.to(x.dtype), w.eps)
    q, k, v = (layer_output(h, L, q8).reshape(B, 1, H, D).transpose(1, 2) for L in (q_w, k_w, v_w))   # (B, H, 1, D)
    k_cache[:, :, start_pos] = k[:, :, 0]
    v_cache[:, :, start_pos] = v[:, :, 0]
    a = attention_reference(q, k_cache[:, :, :start_pos + 1], v_cache[:, :, :start_pos + 1])   # (B, H, 1, D)
    x1 = x + layer_output(a.transpose(1, 2).reshape(B, 1, C), out_w, q8)
    h2 = layer_norm_reference(x1, w.ln2_weight.to(x.dtype), w.ln2_bias.to(x.dtype), w.eps)
    return x1 + layer_output(gelu_reference(layer_output(h2, fc_w, q8)), proj_w, q8)


# ----------------------------------------------------------------------------- the compiled kernel's contract
def _fake(x, norms, weights, scales, biases, k_cache, v_cache, start_pos, eps, int8_activations=False):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def kernel_args(x: torch.Tensor, weights: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                start_pos: int) -> tuple:
    """The kernel's arguments in its one fixed order: x, [ln1_weight, ln1_bias, ln2_weight, ln2_bias], the six
    layers' [weights], [scales], [biases] (q, k, v, out, fc, proj), the caches, start_pos, eps, int8_activations."""
    layers = weights.layers()
    return (x.contiguous(), [weights.ln1_weight, weights.ln1_bias, weights.ln2_weight, weights.ln2_bias],
            [L.weight for L in layers], [L.scales for L in layers], [L.bias for L in layers], k_cache, v_cache,
            start_pos, weights.eps, weights.int8_activations)


def compiled(k, backend: str):
    def decode_block(x, weights, k_cache, v_cache, start_pos):
        return k.decode_block(*kernel_args(x, weights, k_cache, v_cache, start_pos))
    return decode_block


def table_key(x, weights, *_):
    """The fused block runs the linear kernel of the backend picked for the block's linear layers (most of its
    time): `auto` fuses where that backend has a fused block."""
    return {torch.int8: "linear_int8", torch.bfloat16: "linear_bf16"}.get(weights.qkv[0].weight.dtype, "linear")


# ----------------------------------------------------------------------------- cases
def _case(kind: str, B: int, H: int, D: int, F: int, context: int, start_pos: int, stacked: bool,
          found: str = "") -> Case:
    """A block with weights of storage `kind` (float32 leaves follow the run's dtype; int8/bf16 weights are kept
    as stored), random earlier cache rows (not zeros), the new position at `start_pos`."""
    C = H * D
    g0 = torch.Generator().manual_seed(B * 100 + D)
    shapes = [(3 * C, C)] if stacked else [(C, C)] * 3
    shapes += [(C, C), (F, C), (C, F)]
    stored = []
    for N, K in shapes:
        w64 = randn(g0, N, K, scale=K ** -0.5)
        stored.append(weights_of_kind(kind, w64) if kind != "float32" else (None, None))

    def build(g):
        leaves = {"x": randn(g, B, 1, C), "k_cache": randn(g, B, H, context, D), "v_cache": randn(g, B, H, context, D),
                  "norms": torch.cat([1 + randn(g, C, scale=0.1), randn(g, C, scale=0.1)] * 2)}
        for i, (N, K) in enumerate(shapes):
            leaves[f"bias{i}"] = randn(g, N, scale=0.1)
            if kind == "float32":
                leaves[f"weight{i}"] = randn(g, N, K, scale=K ** -0.5)
        return leaves

    def call(backend, t):
        layers = [LinearWeights(t[f"weight{i}"] if kind == "float32" else t[f"stored{i}"], t.get(f"scales{i}"),
                                t[f"bias{i}"]) for i in range(len(shapes))]
        n = t["norms"]
        w = BlockWeights(n[:C], n[C:2 * C], tuple(layers[:-3]), layers[-3], n[2 * C:3 * C], n[3 * C:], layers[-2],
                         layers[-1])
        k_cache, v_cache = t["k_cache"].clone(), t["v_cache"].clone()
        if t["x"].dtype == torch.float64:            # the textbook twin, in float64 throughout
            return reference(t["x"], _to_float64(w), k_cache, v_cache, start_pos)
        return decode_block(t["x"], w, k_cache, v_cache, start_pos, backend=backend)
    extra = {}
    for i, (w, s) in enumerate(stored):
        if w is not None:
            extra[f"stored{i}"] = w
        if s is not None:
            extra[f"scales{i}"] = s
    label = f"B{B} H{H} D{D} F{F} context {context} at {start_pos} {kind}" + (" stacked qkv" if stacked else "")
    return Case(label, build, call, extra=extra, found=found)


def layer_float64(L: LinearWeights) -> LinearWeights:
    """A layer for the float64 twin: int8 stays int8 (dequantized in float64), the rest widened."""
    return LinearWeights(L.weight if L.weight.dtype in (torch.int8, torch.uint8) else L.weight.double(),
                         None if L.scales is None else L.scales.double(), None if L.bias is None else L.bias.double())


def _to_float64(w: BlockWeights) -> BlockWeights:
    """The block for the float64 twin: int8 stays int8 (dequantized in float64), the rest widened."""
    layer = layer_float64
    return w._replace(ln1_weight=w.ln1_weight.double(), ln1_bias=w.ln1_bias.double(), qkv=tuple(map(layer, w.qkv)),
                      out=layer(w.out), ln2_weight=w.ln2_weight.double(), ln2_bias=w.ln2_bias.double(),
                      fc=layer(w.fc), proj=layer(w.proj))


def cases(quick: bool) -> list[Case]:
    return [_case("float32", 1, 2, 80, 640, 8, 0, stacked=False, found="head dim 80, the first position"),
            _case("int8", 3, 3, 16, 100, 130, 129, stacked=True, found="a cache one short of full; F off the vector"),
            _case("bf16", 2, 1, 33, 70, 5, 3, stacked=False, found="C = 33: no whole vector in a row"),
            _case("int8", 16, 1, 32, 128, 9, 4, stacked=False, found="the largest batch the kernel takes")]


def bad_inputs() -> list[BadInput]:
    C, H, D = 32, 2, 16
    layer = lambda N, K: LinearWeights(torch.randn(N, K), None, torch.zeros(N))   # noqa: E731
    w = BlockWeights(torch.ones(C), torch.zeros(C), (layer(3 * C, C),), layer(C, C), torch.ones(C), torch.zeros(C),
                     layer(4 * C, C), layer(C, 4 * C))
    x, k = torch.randn(2, 1, C), torch.randn(2, H, 6, D)
    run = lambda **kw: decode_block(**{"x": x, "weights": w, "k_cache": k, "v_cache": k.clone(),   # noqa: E731
                                       "start_pos": 2, "backend": "extension", **kw})
    q8 = LinearWeights(torch.ones(3 * C, C, dtype=torch.int8), None, None)
    return [BadInput(lambda: run(x=x.double()), TypeError, "x: the decoding block takes float32"),
            BadInput(lambda: run(x=torch.randn(2, 2, C)), ValueError, r"x must have shape \(B, 1, C\)"),
            BadInput(lambda: run(k_cache=torch.randn(2, 3, 6, D)), ValueError, "k_cache must be a float32"),
            BadInput(lambda: run(v_cache=torch.randn(2, H, 5, D)), ValueError, "v_cache must have k_cache's shape"),
            BadInput(lambda: run(start_pos=6), ValueError, r"start_pos must be in \[0, 6\)"),
            BadInput(lambda: run(weights=w._replace(qkv=(q8,))), ValueError, "q weight is int8 and needs scales"),
            BadInput(lambda: run(weights=w._replace(fc=layer(4 * C, 16))), ValueError, r"fc weight must have shape"),
            BadInput(lambda: run(weights=w._replace(proj=w.proj._replace(bias=torch.zeros(5)))), ValueError,
                     "proj bias must be a float32"),
            BadInput(lambda: run(weights=w._replace(ln2_weight=torch.ones(31))), ValueError, "ln2_weight must be"),
            BadInput(lambda: run(weights=w._replace(qkv=w.qkv * 2)), ValueError, "one stacked"),
            BadInput(lambda: run(weights=w._replace(int8_activations=True)), ValueError,
                     "int8_activations needs int8 or 4-bit weights: q weight is torch.float32"),
            BadInput(lambda: run(x=torch.randn(17, 1, C), k_cache=torch.randn(17, H, 6, D),
                                 v_cache=torch.randn(17, H, 6, D)), BackendError, "no fused decoding block"),
            BadInput(lambda: run(backend="torch"), BackendError, "'torch' has no fused decoding block")]


register(Op("decode_block", decode_block, reference, None, cases, bad_inputs, kernels={"decode_block": Kernel(_fake)},
            compiled=compiled, table_keys=("linear", "linear_int8", "linear_bf16"), table_key=table_key,
            inference_only=True, backends=("reference", "extension"), dtypes=("float32",), module=__name__))

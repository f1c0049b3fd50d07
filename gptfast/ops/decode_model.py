"""A whole model's one-token decoding step as one op: `decode_model`.

`decode_block` (GPT-2) and `decode_block_llama` (Llama/Qwen3) make each block one call; a token still returns to
Python once a block and once more for the final norm and the LM head (13 calls a token for GPT-2 124M, 29 for
Qwen3-0.6B), each waking the threads and paying the dispatcher. Here the token is one call: `extension` on CPU
(csrc/cpu/decode_block.cpp `decode_blocks`, csrc/cpu/decode_block_llama.cpp `decode_blocks_llama`) runs every
block as the one-block kernel does, the threads meeting at a barrier between blocks instead of leaving the
parallel region, then the final norm's rows and the LM head's columns. Each element is computed as the ops one by
one compute it: bit-for-bit the op-by-op (and the per-block) extension path, tested. The model takes it by itself
for one new position with a KV cache (`KVCache.run_model`, gptfast/model/kv_cache.py).

The math (`reference` below is the twin the kernel is tested against), x (B, 1, C) the embedded new token:
    for each block i:  x = block_i(x)   writing block i's new keys and values into its cache at start_pos
    logits = head(norm(x))              norm: GPT-2's LayerNorm (weight and bias) or Llama's RMSNorm (weight)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .decode_block import (MAX_BATCH, WEIGHT_DTYPES, BlockWeights, LinearWeights, check_decode_block,
                           check_int8_activations, check_layer, fuses_decode_block, layer_float64, layer_output)
from .decode_block import _to_float64 as gpt_block_float64, kernel_args as gpt_block_args
from .decode_block import reference as gpt_block_reference
from .decode_block_llama import (LlamaBlockWeights, check_decode_block_llama, fuses_decode_block_llama,
                                 kernel_args as llama_block_args, reference as llama_block_reference,
                                 to_float64 as llama_block_float64)
from .layer_norm import reference as layer_norm_reference
from .registry import BackendError, get_backend, resolve_backend_name
from .rms_norm import reference as rms_norm_reference
from .spec import BadInput, Case, Kernel, Op, randn, register


class ModelWeights(NamedTuple):
    """A model as the whole-model step reads it: its blocks (all BlockWeights: GPT-2; all LlamaBlockWeights:
    Llama/Qwen3), the final norm's weight (C,) and bias (C,) (None: an RMSNorm) and the LM head (V, C)."""
    blocks: tuple
    final_norm: torch.Tensor
    final_norm_bias: torch.Tensor | None
    head: LinearWeights

    @property
    def llama(self) -> bool:
        return isinstance(self.blocks[0], LlamaBlockWeights)


def check_decode_model(x, weights: ModelWeights, k_caches, v_caches, start_pos: int, rope) -> None:
    """Every argument, named when it is wrong: each block as decode_block(_llama) checks it (with its own cache
    pair), one kind of block throughout, the final norm (C,) float32, the head's weight (V, C) float32/bfloat16/int8
    with its float32 scales/bias (V,); `rope` (cos, sin) for Llama blocks, None for GPT-2's."""
    blocks = weights.blocks
    if not blocks or len(k_caches) != len(blocks) or len(v_caches) != len(blocks):
        raise ValueError(f"k_caches and v_caches: one cache a block ({len(blocks)} blocks), got {len(k_caches)} and "
                         f"{len(v_caches)}")
    kind = type(blocks[0])
    if kind not in (BlockWeights, LlamaBlockWeights) or any(type(b) is not kind for b in blocks):
        raise TypeError("blocks: all BlockWeights (GPT-2) or all LlamaBlockWeights (Llama/Qwen3)")
    if weights.llama != (rope is not None):
        raise ValueError("rope: (cos, sin) of the position for Llama blocks, None for GPT-2's")
    for block, k, v in zip(blocks, k_caches, v_caches):
        if weights.llama:
            check_decode_block_llama(x, block, k, v, start_pos, *rope)
        else:
            check_decode_block(x, block, k, v, start_pos)
    C = x.shape[-1]
    for name, t in (("final_norm", weights.final_norm), ("final_norm_bias", weights.final_norm_bias)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (C,) or t.device != x.device):
            raise ValueError(f"{name} must be a float32 ({C},) tensor on x's device, got {t.dtype} {tuple(t.shape)}")
    if weights.llama != (weights.final_norm_bias is None):
        raise ValueError("final_norm_bias: GPT-2's LayerNorm has one, Llama's RMSNorm none")
    head = weights.head
    if head.weight.ndim != 2:
        raise ValueError(f"head weight must be a (V, C) tensor, got {tuple(head.weight.shape)}")
    check_layer("head", head, head.weight.shape[0], C, x.device)
    if any(b.int8_activations != blocks[0].int8_activations for b in blocks):
        raise ValueError("int8_activations: all blocks or none")
    check_int8_activations(blocks[0].int8_activations, [("head", head)])


def fuses_decode_model(x: torch.Tensor, weights: ModelWeights, k_caches, backend: str | None = None) -> bool:
    """Whether `backend` runs `decode_model` for these inputs as one fused kernel: where it fuses every block
    (fuses_decode_block(_llama)) and the head is a plain tensor of a storage type the kernel reads."""
    fuses = fuses_decode_block_llama if weights.llama else fuses_decode_block
    name = resolve_backend_name(backend)
    if name == "auto":
        name = get_backend("auto").choice_for("decode_model", x, weights)
    head = weights.head.weight
    return name == "extension" and type(head) in (torch.Tensor, torch.nn.Parameter) and head.dtype in WEIGHT_DTYPES \
        and all(fuses(x, b, k, name) for b, k in zip(weights.blocks, k_caches))


def decode_model(x: torch.Tensor, weights: ModelWeights, k_caches: list, v_caches: list, start_pos: int,
                 rope: tuple | None = None, backend: str | None = None) -> torch.Tensor:
    """The whole model's step for one new position per sequence: x (B, 1, C), the embedded token, -> logits
    (B, 1, V), writing each block's new keys and values into its cache (k_caches[i], v_caches[i]) at `start_pos`.
    `rope`: (cos, sin) (1, head_dim / 2) of the position, for Llama blocks. Inference only. Raises BackendError
    where `backend` has no fused model step for these inputs (`reference` computes it with the textbook twin)."""
    check_decode_model(x, weights, k_caches, v_caches, start_pos, rope)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights.final_norm, weights.head.weight)):
        raise RuntimeError("decode_model is for inference (no backward): run it under torch.no_grad()")
    name = resolve_backend_name(backend)
    if name != "reference" and not fuses_decode_model(x, weights, k_caches, name):
        raise BackendError(f"backend {name!r} has no fused model step for x {x.dtype} on {x.device} with "
                           f"{weights.head.weight.dtype} weights")
    return get_backend(name).decode_model(x, weights, list(k_caches), list(v_caches), start_pos, rope)


class DecodeStep:
    """`decode_model` bound to one model's weights and one set of caches: every argument is checked once, here
    (decode_model checks each layer of each block on every call: ~0.6 ms a token at Qwen3-0.6B's 28 blocks, and
    gathering the weights from the modules ~1 ms more - 5-10% of an int8 step), and each token's call checks
    only what changes from token to token: x's shape, start_pos and the rotary angles. The weights must stay
    the same tensors while the step is used (decoding does not change them; KVCache binds a new step for a new
    model). `step(x, start_pos, rope)` = decode_model(x, weights, k_caches, v_caches, start_pos, rope, backend)."""

    def __init__(self, x: torch.Tensor, weights: ModelWeights, k_caches, v_caches, rope: tuple | None = None,
                 backend: str | None = None):
        check_decode_model(x, weights, k_caches, v_caches, 0, rope)
        name = resolve_backend_name(backend)
        if name != "reference" and not fuses_decode_model(x, weights, k_caches, name):
            raise BackendError(f"backend {name!r} has no fused model step for x {x.dtype} on {x.device} with "
                               f"{weights.head.weight.dtype} weights")
        self.weights, self.k_caches, self.v_caches = weights, list(k_caches), list(v_caches)
        self.x_shape, self.device, self.length = tuple(x.shape), x.device, k_caches[0].shape[2]
        self.rope_shape = None if rope is None else tuple(rope[0].shape)
        self.needs_grad = any(t.requires_grad for t in tensors_of(weights))
        self.run = get_backend(name).decode_model

    def check(self, x: torch.Tensor, start_pos: int, rope: tuple | None) -> None:
        """What may differ from the bound call, named when wrong."""
        if tuple(x.shape) != self.x_shape or x.dtype != torch.float32 or x.device != self.device:
            raise ValueError(f"x must be a float32 {self.x_shape} tensor on {self.device} (the shape this step was "
                             f"bound to), got {x.dtype} {tuple(x.shape)} on {x.device}")
        if not 0 <= start_pos < self.length:
            raise ValueError(f"start_pos must be in [0, {self.length}) (the cache's context), got {start_pos}")
        if (rope is None) != (self.rope_shape is None):
            raise ValueError("rope: (cos, sin) of the position for Llama blocks, None for GPT-2's")
        for name, t in zip(("cos", "sin"), rope or ()):
            if t.dtype != torch.float32 or tuple(t.shape) != self.rope_shape or t.device != self.device:
                raise ValueError(f"{name} must be a float32 {self.rope_shape} tensor on x's device, got {t.dtype} "
                                 f"{tuple(t.shape)}")
        if torch.is_grad_enabled() and (self.needs_grad or x.requires_grad):
            raise RuntimeError("decode_model is for inference (no backward): run it under torch.no_grad()")

    def __call__(self, x: torch.Tensor, start_pos: int, rope: tuple | None = None) -> torch.Tensor:
        self.check(x, start_pos, rope)
        return self.run(x, self.weights, self.k_caches, self.v_caches, start_pos, rope)


def tensors_of(weights) -> list[torch.Tensor]:
    """Every tensor in a ModelWeights (its blocks', layers' and head's), in order."""
    if isinstance(weights, torch.Tensor):
        return [weights]
    if isinstance(weights, (tuple, list)):
        return [t for w in weights for t in tensors_of(w)]
    return []


# ----------------------------------------------------------------------------- the textbook
def reference(x, weights: ModelWeights, k_caches, v_caches, start_pos: int, rope=None) -> torch.Tensor:
    """The blocks one by one (each block's own twin), then the final norm and the LM head."""
    for block, k, v in zip(weights.blocks, k_caches, v_caches):
        if weights.llama:
            x = llama_block_reference(x, block, k, v, start_pos, *rope)
        else:
            x = gpt_block_reference(x, block, k, v, start_pos)
    w, b = weights.final_norm.to(x.dtype), weights.final_norm_bias
    eps = weights.blocks[0].eps
    h = rms_norm_reference(x, w, eps) if b is None else layer_norm_reference(x, w, b.to(x.dtype), eps)
    return layer_output(h, weights.head, weights.blocks[0].int8_activations)


# ----------------------------------------------------------------------------- the compiled kernels' contract
def _fake_gpt(x, norms, weights, scales, biases, k_caches, v_caches, start_pos, eps, final_norm, head_weight,
              head_scales, head_bias, int8_activations=False):
    return torch.empty((x.shape[0], 1, head_weight.shape[0]), dtype=x.dtype, device=x.device)


def _fake_llama(x, norms, weights, scales, biases, k_caches, v_caches, cos, sin, start_pos, eps, final_norm,
                head_weight, head_scales, head_bias, int8_activations=False):
    return torch.empty((x.shape[0], 1, head_weight.shape[0]), dtype=x.dtype, device=x.device)


def kernel_args(x, weights: ModelWeights, k_caches, v_caches, start_pos: int, rope=None) -> tuple:
    """The kernel's arguments: each block's lists (kernel_args of decode_block(_llama)) concatenated, the caches as
    lists, then the final norm and the head."""
    norms, ws, scales, biases = [], [], [], []
    for block, k, v in zip(weights.blocks, k_caches, v_caches):
        a = llama_block_args(x, block, k, v, start_pos, *rope) if weights.llama else \
            gpt_block_args(x, block, k, v, start_pos)
        norms += a[1]
        ws += a[2]
        scales += a[3]
        biases += a[4]
    h = weights.head
    eps, q8 = weights.blocks[0].eps, weights.blocks[0].int8_activations
    if weights.llama:
        return (x.contiguous(), norms, ws, scales, biases, list(k_caches), list(v_caches), rope[0].contiguous(),
                rope[1].contiguous(), start_pos, eps, weights.final_norm, h.weight, h.scales, h.bias, q8)
    return (x.contiguous(), norms, ws, scales, biases, list(k_caches), list(v_caches), start_pos, eps,
            [weights.final_norm, weights.final_norm_bias], h.weight, h.scales, h.bias, q8)


def compiled(k, backend: str):
    def decode_model(x, weights, k_caches, v_caches, start_pos, rope):
        args = kernel_args(x, weights, k_caches, v_caches, start_pos, rope)
        return k.decode_blocks_llama(*args) if weights.llama else k.decode_blocks(*args)
    return decode_model


def table_key(x, weights, *_):
    """The fused step runs the linear kernel of the backend picked for its linear layers (most of its time)."""
    return {torch.int8: "linear_int8", torch.bfloat16: "linear_bf16"}.get(weights.head.weight.dtype, "linear")


def to_float64(w: ModelWeights) -> ModelWeights:
    """The model for the float64 twin: int8 weights stay int8 (dequantized in float64), the rest widened."""
    block = llama_block_float64 if w.llama else gpt_block_float64
    return ModelWeights(tuple(map(block, w.blocks)), w.final_norm.double(),
                        None if w.final_norm_bias is None else w.final_norm_bias.double(), layer_float64(w.head))


# ----------------------------------------------------------------------------- cases
def _case(family: str, kind: str, B: int, L: int, start_pos: int, strided: bool = False, found: str = "") -> Case:
    """A model of L small blocks (GPT-2's: C 48, 3 heads, F 100; Qwen3's: C 40, 4 query heads of 12 over 2 K/V heads,
    F 72), weights of storage `kind` (float32 leaves follow the run's dtype; int8/bf16 weights are kept as stored), a
    37-row LM head, random earlier cache rows, the new position at `start_pos`, context 9; `strided`: x every other
    element of a wider tensor."""
    from .linear import weights_of_kind

    llama = family == "qwen3"
    C, H, Hkv, D, F, V, ctx = (40, 4, 2, 12, 72, 37, 9) if llama else (48, 3, 3, 16, 100, 37, 9)
    shapes = ([(H * D, C), (Hkv * D, C), (Hkv * D, C), (C, H * D), (F, C), (F, C), (C, F)] if llama else
              [(C, C)] * 4 + [(F, C), (C, F)])
    all_shapes = [s for _ in range(L) for s in shapes] + [(V, C)]
    g0 = torch.Generator().manual_seed(B * 10 + L)
    stored = [weights_of_kind(kind, randn(g0, N, K, scale=K ** -0.5)) if kind != "float32" else (None, None)
              for N, K in all_shapes]
    n_norm = (2 * C + 2 * D) if llama else 4 * C

    def build(g):
        leaves = {"x": randn(g, B, 1, 2 * C if strided else C), "caches": randn(g, 2 * L, B, Hkv, ctx, D),
                  "norms": 1 + randn(g, L * n_norm + 2 * C, scale=0.1)}
        if not llama:
            leaves["biases"] = randn(g, sum(N for N, _ in all_shapes), scale=0.1)
        for i, (N, K) in enumerate(all_shapes):
            if kind == "float32":
                leaves[f"weight{i}"] = randn(g, N, K, scale=K ** -0.5)
        return leaves

    def call(backend, t):
        offsets = torch.tensor([0] + [N for N, _ in all_shapes]).cumsum(0).tolist()
        layers = [LinearWeights(t[f"weight{i}"] if kind == "float32" else t[f"stored{i}"], t.get(f"scales{i}"),
                                None if llama else t["biases"][offsets[i]:offsets[i + 1]])
                  for i in range(len(all_shapes))]
        n = t["norms"]
        blocks = []
        for i in range(L):
            ls, nb = layers[i * len(shapes):(i + 1) * len(shapes)], n[i * n_norm:(i + 1) * n_norm]
            if llama:
                blocks.append(LlamaBlockWeights(nb[:C], *ls[:4], nb[C:2 * C], *ls[4:], nb[2 * C:2 * C + D],
                                                nb[2 * C + D:], 1e-6))
            else:
                blocks.append(BlockWeights(nb[:C], nb[C:2 * C], tuple(ls[:3]), ls[3], nb[2 * C:3 * C], nb[3 * C:],
                                           ls[4], ls[5], 1e-5))
        fn = n[L * n_norm:]
        w = ModelWeights(tuple(blocks), fn[:C], None if llama else fn[C:], layers[-1])
        caches = t["caches"].clone()
        ks, vs = list(caches[:L].unbind(0)), list(caches[L:].unbind(0))
        angles = torch.arange(D // 2, dtype=torch.float64)[None] * 0.3 * (start_pos + 1) / D
        x = t["x"][..., ::2] if strided else t["x"]
        rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype)) if llama else None
        if x.dtype == torch.float64:                 # the textbook twin, in float64 throughout
            return reference(x, to_float64(w), ks, vs, start_pos, rope)
        return decode_model(x, w, ks, vs, start_pos, rope, backend=backend)
    extra = {}
    for i, (w, s) in enumerate(stored):
        if w is not None:
            extra[f"stored{i}"] = w
        if s is not None:
            extra[f"scales{i}"] = s
    return Case(f"{family} B{B} L{L} at {start_pos} {kind}" + (" strided x" if strided else ""), build, call, extra=extra, found=found)


def cases(quick: bool) -> list[Case]:
    return [_case("gpt2", "float32", 1, 3, 0, found="the first position; three blocks, the buffers taking turns"),
            _case("gpt2", "int8", 5, 2, 8, found="a full cache; C = 48, a vector and a half in AVX-512"),
            _case("qwen3", "bf16", 2, 3, 4, strided=True, found="grouped-query blocks, C = 40 != heads x head_dim = 48"),
            _case("qwen3", "int8", 16, 1, 6, found="one block, the largest batch")]


def bad_inputs() -> list[BadInput]:
    C, H, D = 32, 2, 16
    layer = lambda N, K: LinearWeights(torch.randn(N, K), None, torch.zeros(N))   # noqa: E731
    block = BlockWeights(torch.ones(C), torch.zeros(C), (layer(3 * C, C),), layer(C, C), torch.ones(C), torch.zeros(C),
                         layer(4 * C, C), layer(C, 4 * C))
    w = ModelWeights((block, block), torch.ones(C), torch.zeros(C), LinearWeights(torch.randn(11, C)))
    x, k = torch.randn(2, 1, C), torch.randn(2, H, 6, D)
    run = lambda **kw: decode_model(**{"x": x, "weights": w, "k_caches": [k, k.clone()],   # noqa: E731
                                       "v_caches": [k.clone(), k.clone()], "start_pos": 2, "backend": "extension",
                                       **kw})
    return [BadInput(lambda: run(k_caches=[k]), ValueError, "one cache a block"),
            BadInput(lambda: run(x=x.double()), TypeError, "x: the decoding block takes float32"),
            BadInput(lambda: run(rope=(torch.ones(1, 8), torch.ones(1, 8))), ValueError, "rope: "),
            BadInput(lambda: run(weights=w._replace(final_norm=torch.ones(31))), ValueError, "final_norm must be"),
            BadInput(lambda: run(weights=w._replace(final_norm_bias=None)), ValueError, "final_norm_bias: "),
            BadInput(lambda: run(weights=w._replace(head=LinearWeights(torch.randn(11, 5)))), ValueError,
                     r"head weight must have shape \(11, 32\)"),
            BadInput(lambda: run(weights=w._replace(head=LinearWeights(torch.ones(11, C, dtype=torch.int8)))),
                     ValueError, "head weight is int8 and needs scales"),
            BadInput(lambda: run(weights=w._replace(head=LinearWeights(torch.randn(11, C), None, torch.zeros(3)))),
                     ValueError, r"head bias must be a float32 \(11,\)"),
            BadInput(lambda: run(start_pos=6), ValueError, r"start_pos must be in \[0, 6\)"),
            BadInput(lambda: run(x=torch.randn(MAX_BATCH + 1, 1, C), k_caches=[torch.randn(17, H, 6, D)] * 2,
                                 v_caches=[torch.randn(17, H, 6, D)] * 2), BackendError, "no fused model step"),
            BadInput(lambda: run(backend="torch"), BackendError, "'torch' has no fused model step")]


register(Op("decode_model", decode_model, reference, None, cases, bad_inputs,
            kernels={"decode_blocks": Kernel(_fake_gpt), "decode_blocks_llama": Kernel(_fake_llama)},
            compiled=compiled, table_keys=("linear", "linear_int8", "linear_bf16"), table_key=table_key,
            inference_only=True, backends=("reference", "extension"), dtypes=("float32",), module=__name__))

"""The op cases `compare` runs: GPT-2 shapes and the edge shapes that break naive kernels.

Each case builds fresh random float64 inputs (never zeros) and says how to call the op interface on
them with a given backend. Inputs that are views (non-contiguous cases) are built from a contiguous
leaf tensor inside `call`, so gradients flow back to the leaf the comparison reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import ops

GPT2_VOCAB = 50257


@dataclass
class OpCase:
    op: str                                   # layer_norm | gelu | causal_attention | cross_entropy |
                                              # linear_cross_entropy | dropout_add
    label: str                                # shape and variant, as the table shows it
    build: Callable[[torch.Generator], dict]  # generator -> {name: float64 CPU leaf tensor}
    call: Callable[[str, dict], torch.Tensor]  # (backend, leaves on the device at the dtype) -> output
    small: bool = True                        # cheap enough for Triton's CPU interpreter
    random: bool = False                      # dropout: only backends sharing the reference's
                                              # counter-based RNG compute the same function
    extra: dict = field(default_factory=dict)  # non-differentiable inputs (targets), kept as built


def _randn(g, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def layer_norm_case(rows: int, C: int, transposed: bool = False, small: bool = True) -> OpCase:
    """x (rows, C) with non-zero mean; `transposed`: x is a (C, rows) leaf seen through .t()."""
    def build(g):
        shape = (C, rows) if transposed else (rows, C)
        return {"x": _randn(g, *shape, scale=2.0, shift=0.5), "weight": _randn(g, C, scale=0.5, shift=1.0),
                "bias": _randn(g, C, scale=0.5)}

    def call(backend, t):
        x = t["x"].t() if transposed else t["x"]
        return ops.layer_norm(x, t["weight"], t["bias"], backend=backend)
    return OpCase("layer_norm", f"{rows}x{C}{' non-contiguous' if transposed else ''}", build, call, small)


def gelu_case(shape: tuple, transposed: bool = False, small: bool = True) -> OpCase:
    def build(g):
        return {"x": _randn(g, *(shape[::-1] if transposed else shape), scale=2.0)}

    def call(backend, t):
        return ops.gelu(t["x"].t() if transposed else t["x"], backend=backend)
    label = "x".join(map(str, shape)) + (" non-contiguous" if transposed else "")
    return OpCase("gelu", label, build, call, small)


def attention_case(B: int, H: int, T: int, D: int, Tk: int | None = None, dropout: float = 0.0,
                   fused_qkv: bool = False, small: bool = True) -> OpCase:
    """q (B, H, T, D), k/v (B, H, Tk, D). `Tk` > T: a KV cache (queries are the last T positions).
    `fused_qkv`: q, k, v are strided views of one (B, T, 3, H, D) tensor, as a fused QKV projection
    gives them. `dropout` > 0: a fixed seed, so backends sharing the counter-based RNG drop the same
    weights as the reference and agree to rounding; any mask difference shows as an O(1) error."""
    Tk = Tk or T
    seed = torch.tensor([1234], dtype=torch.int64)

    def build(g):
        if fused_qkv:
            return {"qkv": _randn(g, B, T, 3, H, D)}
        return {"q": _randn(g, B, H, T, D), "k": _randn(g, B, H, Tk, D), "v": _randn(g, B, H, Tk, D)}

    def call(backend, t):
        if fused_qkv:
            q, k, v = t["qkv"].permute(2, 0, 3, 1, 4).unbind(0)     # each (B, H, T, D), non-contiguous
        else:
            q, k, v = t["q"], t["k"], t["v"]
        return ops.causal_attention(q, k, v, dropout_p=dropout, seed=seed, backend=backend)
    label = f"B{B} H{H} T{T} D{D}"
    if Tk != T:
        label += f" KV-cache Tk{Tk}"
    if dropout:
        label += f" dropout {dropout:g}"
    if fused_qkv:
        label += " non-contiguous"
    return OpCase("causal_attention", label, build, call, small, random=dropout > 0.0)


def cross_entropy_case(N: int, V: int, ignored: float = 0.0, transposed: bool = False,
                       small: bool = True) -> OpCase:
    """logits (N, V) scaled like a trained model's; a fraction `ignored` of the targets is -100."""
    def build(g):
        logits = _randn(g, *((V, N) if transposed else (N, V)), scale=3.0)
        return {"logits": logits}

    g = torch.Generator().manual_seed(N * 7 + V)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored:
        drop = torch.rand(N, generator=g) < ignored
        drop[0] = True                                   # at least one ignored row
        if N > 1:
            drop[-1] = False                             # and at least one counted
        targets = torch.where(drop, -100, targets)

    def call(backend, t):
        logits = t["logits"].t() if transposed else t["logits"]
        return ops.cross_entropy(logits, t["targets"], ignore_index=-100, backend=backend)
    label = f"{N}x{V}" + (f" ignore_index on {int((targets == -100).sum())} rows" if ignored else "") + \
        (" non-contiguous" if transposed else "")
    return OpCase("cross_entropy", label, build, call, small, extra={"targets": targets})


def linear_cross_entropy_case(N: int, C: int, V: int, ignored: float = 0.0, chunk_rows: int | None = None,
                              small: bool = True) -> OpCase:
    """The LM head fused with the loss: hidden (N, C), weight (V, C) at GPT-2's init scale; `chunk_rows`
    that does not divide N (the fused kernels' chunk loop), a fraction `ignored` of targets -100."""
    def build(g):
        return {"hidden": _randn(g, N, C), "weight": _randn(g, V, C, scale=0.05)}

    g = torch.Generator().manual_seed(N * 13 + V)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignored:
        targets = torch.where(torch.rand(N, generator=g) < ignored, -100, targets)
        targets[-1] = 0

    def call(backend, t):
        return ops.linear_cross_entropy(t["hidden"], t["weight"], t["targets"], chunk_rows=chunk_rows, backend=backend)
    label = f"{N}x{C} @ {V}x{C}" + (f" chunks of {chunk_rows}" if chunk_rows else "") + \
        (f" ignore_index on {int((targets == -100).sum())} rows" if ignored else "")
    return OpCase("linear_cross_entropy", label, build, call, small, extra={"targets": targets})


def dropout_add_case(shape: tuple, residual: bool = True, transposed: bool = False, p: float = 0.1,
                     small: bool = True) -> OpCase:
    """residual + dropout(x) with a fixed seed: backends sharing the counter-based RNG drop the same
    elements as the reference; `transposed`: x is a leaf of the reversed shape seen through .t()."""
    seed = torch.tensor([4321], dtype=torch.int64)

    def build(g):
        leaves = {"x": _randn(g, *(shape[::-1] if transposed else shape))}
        if residual:
            leaves["residual"] = _randn(g, *shape)
        return leaves

    def call(backend, t):
        x = t["x"].t() if transposed else t["x"]
        return ops.dropout_add(x, t.get("residual"), p, seed=seed, backend=backend)
    label = "x".join(map(str, shape)) + ("" if residual else " no residual") + \
        (" non-contiguous" if transposed else "") + f" p {p:g}"
    return OpCase("dropout_add", label, build, call, small, random=True)


def op_cases(device: torch.device, quick: bool) -> list[OpCase]:
    """Every case for this run. `quick`: the edge shapes at small sizes only. Otherwise also GPT-2's
    shapes (B8 x T1024 rows on a GPU; B2 on a CPU, where the float64 reference is slow); cases marked
    not `small` never go to the Triton interpreter."""
    gpu = device.type == "cuda"
    cases = [layer_norm_case(64, 768), layer_norm_case(33, 1023), layer_norm_case(16, 1600),
             layer_norm_case(1, 768), layer_norm_case(48, 768, transposed=True),
             gelu_case((7, 1023)), gelu_case((64, 3072)), gelu_case((1, 1600)), gelu_case((129, 80), transposed=True),
             attention_case(1, 2, 1, 64), attention_case(2, 2, 7, 64), attention_case(1, 2, 129, 64),
             attention_case(1, 1, 129, 16), attention_case(1, 1, 65, 80), attention_case(1, 1, 65, 128),
             attention_case(2, 3, 33, 32, fused_qkv=True),
             attention_case(2, 3, 48, 64, dropout=0.1),
             attention_case(1, 2, 1, 64, Tk=77), attention_case(1, 2, 7, 64, Tk=129, dropout=0.1),
             cross_entropy_case(1, 1023), cross_entropy_case(7, GPT2_VOCAB), cross_entropy_case(64, 1023, ignored=0.25),
             cross_entropy_case(16, 1023, transposed=True),
             linear_cross_entropy_case(7, 32, 1003, chunk_rows=3), linear_cross_entropy_case(1, 64, 257),
             linear_cross_entropy_case(100, 48, 2000, ignored=0.2, chunk_rows=32),
             dropout_add_case((2, 7, 768)), dropout_add_case((33, 1023), residual=False),
             dropout_add_case((129, 80), transposed=True, p=0.5)]
    if quick:
        return cases
    rows = 8 * 1024 if gpu else 2 * 1024
    big = dict(small=False)
    cases += [layer_norm_case(rows, 768, **big), layer_norm_case(rows, 1600, **big),
              gelu_case((rows, 3072), **big),
              attention_case(1, 4, 1000, 64, **big), attention_case(1, 2, 1000, 80, **big),
              attention_case(1, 2, 257, 128, **big),
              attention_case(8 if gpu else 2, 12, 1024, 64, **big),
              attention_case(8 if gpu else 2, 12, 1024, 64, dropout=0.1, **big),
              attention_case(1, 12, 64, 64, Tk=1000, **big),
              cross_entropy_case(4096 if gpu else 256, GPT2_VOCAB, ignored=0.1, **big),
              cross_entropy_case(1024 if gpu else 128, 50304, **big),
              linear_cross_entropy_case(4096 if gpu else 512, 768, GPT2_VOCAB, ignored=0.05, **big),
              linear_cross_entropy_case(1000, 768, 50304, **big),
              dropout_add_case((rows, 768), **big), dropout_add_case((rows, 1600), residual=False, **big)]
    return cases

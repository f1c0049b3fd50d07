"""The `extension` backend: our compiled kernels (csrc/) as torch custom ops.

The op schemas live in C++ (`TORCH_LIBRARY(gptfast, ...)` in csrc/ops.cpp) and are reached as
`torch.ops.gptfast.*`. This module adds what torch.compile and autograd need on the Python side:
a fake (meta) kernel per op, which only describes output shapes and dtypes, and an autograd
formula wiring each forward op to its backward op.
"""
from __future__ import annotations

import math

import torch

from .. import compiled
from ..compiled import load_extension
from . import autograd_formulas as formulas
from . import torch_builtins

_C = load_extension()   # ImportError with the reason when it cannot be built or loaded
KERNELS = torch.ops.gptfast


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    # the kernels return contiguous tensors whatever the input strides; the fakes must agree
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("gptfast::layer_norm_fwd")
def _(x, weight, bias, eps):
    stats = x.shape[:-1]
    return _empty(x.shape, x), _empty(stats, x, _stat_dtype(x.dtype)), _empty(stats, x, _stat_dtype(x.dtype))


@torch.library.register_fake("gptfast::layer_norm_bwd")
def _(dy, x, weight, mean, rstd):
    return _empty(x.shape, x), _empty(weight.shape, weight), _empty(weight.shape, weight)


@torch.library.register_fake("gptfast::gelu_fwd")
def _(x):
    return _empty(x.shape, x)


@torch.library.register_fake("gptfast::gelu_bwd")
def _(dy, x):
    return _empty(x.shape, x)


@torch.library.register_fake("gptfast::attention_fwd")
def _(q, k, v, causal, scale, dropout_p, seed):
    return _empty(q.shape, q), _empty(q.shape[:3], q, _stat_dtype(q.dtype))


@torch.library.register_fake("gptfast::attention_bwd")
def _(dout, q, k, v, o, lse, causal, scale, dropout_p, seed):
    return _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)


@torch.library.register_fake("gptfast::cross_entropy_fwd")
def _(logits, targets, ignore_index, compute_grad):
    N = logits.shape[0]
    stat = _stat_dtype(logits.dtype)
    return (_empty((N,), logits, stat), _empty((N,), logits, stat),
            _empty(logits.shape if compute_grad else (0,), logits))


@torch.library.register_fake("gptfast::cross_entropy_bwd")
def _(dlogits, grad_loss):
    return _empty(dlogits.shape, dlogits)


@torch.library.register_fake("gptfast::linear_cross_entropy_fwd")
def _(hidden, weight, targets, ignore_index, chunk_rows, compute_grad):
    loss = hidden.new_empty((), dtype=_stat_dtype(hidden.dtype))
    if not compute_grad:
        return loss, hidden.new_empty((0,)), weight.new_empty((0,))
    return loss, _empty(hidden.shape, hidden), _empty(weight.shape, weight)


@torch.library.register_fake("gptfast::linear_fwd")
def _(x, weight, scales, bias):
    return _empty((*x.shape[:-1], weight.shape[0]), x)


@torch.library.register_fake("gptfast::decode_block")
def _(x, ln1_weight, ln1_bias, qkv_weights, qkv_scales, qkv_biases, out_weight, out_scales, out_bias, ln2_weight,
      ln2_bias, fc_weight, fc_scales, fc_bias, proj_weight, proj_scales, proj_bias, k_cache, v_cache, start_pos, eps):
    return _empty(x.shape, x)


@torch.library.register_fake("gptfast::dropout_add_fwd")
def _(x, residual, p, seed):
    return _empty(x.shape, x, residual.dtype if residual is not None else x.dtype)


@torch.library.register_fake("gptfast::dropout_bwd")
def _(dy, p, seed, dtype):
    return _empty(dy.shape, dy, dtype)


# ----------------------------------------------------------------------------- autograd
for _name, _formula in (("layer_norm", formulas.layer_norm), ("gelu", formulas.gelu),
                        ("attention", formulas.attention), ("cross_entropy", formulas.cross_entropy)):
    formulas.register(f"gptfast::{_name}_fwd", _formula, getattr(KERNELS, f"{_name}_bwd"))
formulas.register("gptfast::linear_cross_entropy_fwd", formulas.linear_cross_entropy, None)
formulas.register("gptfast::dropout_add_fwd", formulas.dropout_add, KERNELS.dropout_bwd)


# ----------------------------------------------------------------------------- backend functions
_COMPILED_FOR = set(_C.build_info()["compiled_backends"])   # {"cpu"} or {"cpu", "cuda"}
_SHAPE_ONLY = {"meta"}                                         # served by the fake kernels


def _check_device(t: torch.Tensor) -> None:
    if t.device.type not in _COMPILED_FOR | _SHAPE_ONLY:
        raise RuntimeError(f"the extension backend has no {t.device.type} kernels in this build "
                           f"(compiled for: {', '.join(sorted(_COMPILED_FOR))}); use another backend "
                           "or rebuild gptfast with a CUDA toolkit")


def layer_norm(x, weight, bias, eps=1e-5):
    _check_device(x)
    return KERNELS.layer_norm_fwd(x, weight, bias, eps)[0]


def gelu(x):
    _check_device(x)
    return KERNELS.gelu_fwd(x)


def dropout_add(x, residual, p, seed):
    _check_device(x)
    return KERNELS.dropout_add_fwd(x, residual, p, seed)


def supports_kv_cache(device: torch.device) -> bool:
    return True                          # CPU and CUDA kernels take Tk >= Tq (queries = the last positions)


with torch.inference_mode(False):      # this module may first load inside inference mode (generation),
    _NO_SEED = torch.zeros(1, dtype=torch.int64)   # and training saves the seed: a normal tensor. Read only when dropout_p > 0


def causal_attention(q, k, v, dropout_p=0.0, scale=None, seed=None):
    _check_device(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if seed is None:                               # the interface draws one when dropout_p > 0
        seed = _NO_SEED
    return KERNELS.attention_fwd(q, k, v, True, scale, dropout_p, seed)[0]


def cross_entropy(logits, targets, ignore_index=-100):
    _check_device(logits)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss_rows = KERNELS.cross_entropy_fwd(logits, targets, ignore_index, compute_grad)[0]
    return formulas.mean_over_kept(loss_rows, targets, ignore_index)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_rows=256):
    _check_device(hidden)
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return KERNELS.linear_cross_entropy_fwd(hidden, weight, targets, ignore_index, chunk_rows, compute_grad)[0]


def _linear_kernel_takes(x: torch.Tensor) -> bool:
    """Our linear kernels: float32 activations on CPU; float32/bfloat16/float16 on CUDA when built."""
    if x.device.type not in _COMPILED_FOR | _SHAPE_ONLY:
        return False
    return x.dtype == torch.float32 or (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16))


def linear(x, weight, bias=None):
    if not _linear_kernel_takes(x):
        return torch_builtins.linear(x, weight, bias)
    return KERNELS.linear_fwd(x, weight, None, bias)


def linear_int8(x, weight, scales, bias=None):
    if not _linear_kernel_takes(x):                 # e.g. bfloat16 activations on CPU: PyTorch's int8 op
        return torch_builtins.linear_int8(x, weight, scales, bias)
    return KERNELS.linear_fwd(x, weight, scales, bias)


def linear_bf16(x, weight, bias=None):
    if not _linear_kernel_takes(x):
        return torch_builtins.linear_bf16(x, weight, bias)
    return KERNELS.linear_fwd(x, weight, None, bias)


DECODE_BLOCK_MAX_BATCH = 16     # sequences the fused block takes: the linear kernel's few-rows range (linear.cpp)
_DECODE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def fuses_decode_block(x, weights, k_cache) -> bool:
    """The fused decoding block (csrc/cpu/decode_block.cpp) takes float32 activations and cache on CPU,
    up to DECODE_BLOCK_MAX_BATCH sequences, float32/bfloat16/int8 weights (plain tensors)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or k_cache.dtype != torch.float32 \
            or not k_cache.is_contiguous() or not 1 <= x.shape[0] <= DECODE_BLOCK_MAX_BATCH or "cpu" not in _COMPILED_FOR:
        return False
    layers = (*weights.qkv, weights.out, weights.fc, weights.proj)
    return all(type(L.weight) in (torch.Tensor, torch.nn.Parameter) and L.weight.dtype in _DECODE_WEIGHT_DTYPES
               for L in layers)


def decode_block(x, weights, k_cache, v_cache, start_pos):
    w = weights
    return KERNELS.decode_block(
        x.contiguous(), w.ln1_weight, w.ln1_bias, [L.weight for L in w.qkv], [L.scales for L in w.qkv],
        [L.bias for L in w.qkv], w.out.weight, w.out.scales, w.out.bias, w.ln2_weight, w.ln2_bias,
        w.fc.weight, w.fc.scales, w.fc.bias, w.proj.weight, w.proj.scales, w.proj.bias, k_cache, v_cache,
        start_pos, w.eps)


def build_info() -> dict:
    info = dict(_C.build_info())
    info["cpu_isa"] = compiled.cpu_kernels_isa()      # of the CPU kernels in use (AVX-512 ones live apart)
    return info


def set_poison_outputs(on: bool) -> None:
    """NaN-fill kernel outputs before they are written (testing aid), CPU and CUDA kernels alike."""
    compiled.set_poison_outputs(on)

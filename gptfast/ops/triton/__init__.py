"""Triton kernels for gptfast's ops, one file per op family, each launch wrapped in a
`torch.library.custom_op` (opaque to torch.compile; `triton_op`/`wrap_triton` break under the
interpreter) with a fake kernel and an autograd formula.

On a machine without a CUDA GPU the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set here before any kernel is defined): slow, float32/float16 only, but the
same kernel code. Importing this package needs Triton; `import gptfast` does not.

This package is the `triton` op backend: `layer_norm`, `gelu`, `causal_attention`, `cross_entropy`,
`linear_cross_entropy`, `dropout_add`, and the inference linear layers `linear`, `linear_int8`, `linear_bf16`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede every @triton.jit below

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from . import attention as _attention, cross_entropy as _cross_entropy, gelu as _gelu  # noqa: E402
from . import layer_norm as _layer_norm  # noqa: E402
from .dropout import dropout_add_fwd, dropout_bwd  # noqa: E402
from .attention import attention_bwd, attention_fwd, supports_kv_cache  # noqa: E402
from .cross_entropy import cross_entropy_bwd, cross_entropy_fwd, linear_cross_entropy_fwd  # noqa: E402
from .gelu import gelu_bwd, gelu_fwd  # noqa: E402
from .layer_norm import layer_norm_bwd, layer_norm_fwd  # noqa: E402
from .linear import linear_fwd  # noqa: E402


# The backend functions. The interpreter computes bfloat16 wrongly (a Triton limitation), so on
# CPU tensors bfloat16 inputs - what bfloat16 autocast on CPU produces - run in float32 and the
# result is rounded back; on a GPU every dtype goes to the kernels as it is.
def _interpreted_bf16(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def layer_norm(x, weight, bias, eps=1e-5):
    if _interpreted_bf16(x):
        return _layer_norm.layer_norm(x.float(), weight.float(), bias.float(), eps).to(x.dtype)
    return _layer_norm.layer_norm(x, weight, bias, eps)


def gelu(x):
    if _interpreted_bf16(x):
        return _gelu.gelu(x.float()).to(x.dtype)
    return _gelu.gelu(x)


def causal_attention(q, k, v, dropout_p=0.0, scale=None, seed=None):
    if _interpreted_bf16(q):
        return _attention.causal_attention(q.float(), k.float(), v.float(), dropout_p, scale, seed).to(q.dtype)
    return _attention.causal_attention(q, k, v, dropout_p, scale, seed)


def cross_entropy(logits, targets, ignore_index=-100):
    if _interpreted_bf16(logits):
        return _cross_entropy.cross_entropy(logits.float(), targets, ignore_index)
    return _cross_entropy.cross_entropy(logits, targets, ignore_index)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, chunk_rows=256):
    if _interpreted_bf16(hidden):
        return _cross_entropy.linear_cross_entropy(hidden.float(), weight.float(), targets, ignore_index, chunk_rows)
    return _cross_entropy.linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_rows)


def dropout_add(x, residual, p, seed):
    if _interpreted_bf16(x) or (residual is not None and _interpreted_bf16(residual)):
        out = residual.dtype if residual is not None else x.dtype
        return dropout_add_fwd(x.float(), residual.float() if residual is not None else None, p, seed).to(out)
    return dropout_add_fwd(x, residual, p, seed)


def _linear(x, weight, scales, bias):
    if _interpreted_bf16(x):
        y = linear_fwd(x.float(), weight, scales, bias.float() if bias is not None else None)
        return y.to(x.dtype)
    return linear_fwd(x, weight, scales, bias)


def linear(x, weight, bias=None):
    if _interpreted_bf16(x):                  # float32 math on the widened weights, rounded back
        return _linear(x, weight.float(), None, bias)
    return _linear(x, weight, None, bias)


def linear_int8(x, weight, scales, bias=None):
    return _linear(x, weight, scales, bias)


def linear_bf16(x, weight, bias=None):
    return _linear(x, weight, None, bias)


def build_info() -> dict:
    import triton

    return {"triton": triton.__version__, "mode": "interpreter (CPU tensors)" if INTERPRET else "GPU"}


__all__ = ["layer_norm", "layer_norm_fwd", "layer_norm_bwd", "gelu", "gelu_fwd", "gelu_bwd",
           "causal_attention", "attention_fwd", "attention_bwd", "supports_kv_cache", "cross_entropy", "cross_entropy_fwd",
           "linear_cross_entropy", "linear_cross_entropy_fwd",
           "linear", "linear_int8", "linear_bf16", "linear_fwd", "dropout_add", "dropout_add_fwd", "dropout_bwd",
           "cross_entropy_bwd", "INTERPRET", "build_info"]

"""Triton kernels for gptfast's ops, one file per op family, each launch wrapped in a
`torch.library.custom_op` (opaque to torch.compile; `triton_op`/`wrap_triton` break under the
interpreter) with a fake kernel and an autograd formula.

On a machine without a CUDA GPU the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set here before any kernel is defined): slow, float32/float16 only, but the
same kernel code. Importing this package needs Triton; `import gptfast` does not.

This package is the `triton` op backend: `layer_norm`, `gelu`, `causal_attention`, `cross_entropy`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede every @triton.jit below

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from .attention import attention_bwd, attention_fwd, causal_attention, supports_kv_cache  # noqa: E402
from .cross_entropy import cross_entropy, cross_entropy_bwd, cross_entropy_fwd  # noqa: E402
from .gelu import gelu, gelu_bwd, gelu_fwd  # noqa: E402
from .layer_norm import layer_norm, layer_norm_bwd, layer_norm_fwd  # noqa: E402


def build_info() -> dict:
    import triton

    return {"triton": triton.__version__, "mode": "interpreter (CPU tensors)" if INTERPRET else "GPU"}


__all__ = ["layer_norm", "layer_norm_fwd", "layer_norm_bwd", "gelu", "gelu_fwd", "gelu_bwd",
           "causal_attention", "attention_fwd", "attention_bwd", "supports_kv_cache", "cross_entropy", "cross_entropy_fwd",
           "cross_entropy_bwd", "INTERPRET", "build_info"]

"""Triton kernels for gptfast's ops, one file per op family, each launch wrapped in a
`torch.library.custom_op` (opaque to torch.compile; `triton_op`/`wrap_triton` break under the
interpreter) with a fake kernel and an autograd formula.

On a machine without a CUDA GPU the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set here before any kernel is defined): slow, float32/float16 only, but the
same kernel code. Importing this package needs Triton; `import gptfast` does not.

Status: LayerNorm and GELU are here; attention and cross-entropy are not yet, so this package is
not registered as an op backend yet.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede every @triton.jit below

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from .gelu import gelu, gelu_bwd, gelu_fwd  # noqa: E402
from .layer_norm import layer_norm, layer_norm_bwd, layer_norm_fwd  # noqa: E402

__all__ = ["layer_norm", "layer_norm_fwd", "layer_norm_bwd", "gelu", "gelu_fwd", "gelu_bwd", "INTERPRET"]

"""The `triton` backend: our Triton kernels, one file per op family, each launch wrapped in a
`torch.library.custom_op` (`torch.ops.gptfast_triton.*`; opaque to torch.compile - `triton_op`/`wrap_triton`
break under the interpreter) with the same signature as the C++ kernel op of the same name. Their fake kernels,
autograd formulas and how the backend calls them come from the op modules (gptfast/ops/<op>.py), as for the
C++ kernels.

On a machine without a CUDA GPU the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set here before any kernel is defined): slow, float32/float16 in the kernels (bfloat16 runs
in float32, _interpreter.py), but the same kernel code. Importing this package needs Triton; `import gptfast`
does not.
"""
import importlib
import os
import pkgutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede every @triton.jit below

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from ..spec import compiled_functions, register_kernel_contracts  # noqa: E402

KERNEL_FILES = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_")]       # each defines its gptfast_triton:: custom ops (_*: helpers)
register_kernel_contracts("gptfast_triton", "triton")
globals().update(compiled_functions("gptfast_triton", "triton"))


def supports_kv_cache(device) -> bool:
    return True                          # the kernels take Tk >= Tq (queries = the last positions)


def build_info() -> dict:
    import triton

    return {"triton": triton.__version__, "mode": "interpreter (CPU tensors)" if INTERPRET else "GPU"}

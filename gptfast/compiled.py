"""Loading gptfast._C, the compiled C++ extension (csrc/), with a reason when it cannot be had.

The ahead-of-time build (`pip install -e . --no-build-isolation`) leaves `gptfast/_C*.so` plus a
build record (`_C_build.json`: torch version and a fingerprint of csrc/). If the module is
missing, or stale (csrc/ edited since, or built against another torch), it is compiled just in
time with torch.utils.cpp_extension (once; cached in TORCH_EXTENSIONS_DIR) unless GPTFAST_JIT=0.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from . import _build_meta as meta

REBUILD_HINT = "build it with: pip install -e . --no-build-isolation"
_module: ModuleType | None = None
_error: str | None = None


def _prebuilt_problem() -> str | None:
    """Why the ahead-of-time build cannot be used, or None when it can."""
    import torch

    if importlib.util.find_spec("gptfast._C") is None:
        return "gptfast._C is not built"
    info = meta.read_build_info()
    if info is None:
        return None  # built without a record (e.g. by hand): trust it
    current = meta.source_hash()
    if current is not None and info.get("source_hash") != current:
        return "gptfast._C is stale: csrc/ changed since it was built"
    if info.get("torch_version") != torch.__version__:
        return f"gptfast._C was built for torch {info.get('torch_version')}, this is torch {torch.__version__}"
    return None


def _jit_build(problem: str) -> ModuleType:
    import torch
    from torch.utils.cpp_extension import load

    from torch.utils.cpp_extension import CUDA_HOME

    src_hash = meta.source_hash()
    sources, cflags, cuda_flags = meta.cpu_sources(), meta.cxx_flags(src_hash), None
    cuda, _why = meta.want_cuda(torch.version.cuda, CUDA_HOME, len(meta.cuda_sources()))
    if cuda:
        sources += meta.cuda_sources()
        cflags, cuda_flags = cflags + ["-DGPTFAST_WITH_CUDA"], meta.nvcc_flags()
    print(f"gptfast: {problem}; compiling the C++{'/CUDA' if cuda else ''} extension now (once, then cached; "
          "a minute or more)...", file=sys.stderr)
    return load(name="gptfast_C", sources=[os.path.join(meta.ROOT, s) for s in sources], extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags, extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False)


def load_extension(allow_jit: bool = True) -> ModuleType:
    """The compiled module; raises ImportError saying why it is unavailable and how to fix it."""
    global _module, _error
    if _module is not None:
        return _module
    problem = _prebuilt_problem()
    if problem is None:
        _module = importlib.import_module("gptfast._C")
        return _module
    if _error is not None:
        raise ImportError(_error)
    if not allow_jit:
        raise ImportError(f"{problem}; {REBUILD_HINT}")
    if os.environ.get("GPTFAST_JIT", "1") == "0" or not os.path.isdir(meta.CSRC):
        _error = f"{problem} (and GPTFAST_JIT=0 or no csrc/ to compile); {REBUILD_HINT}"
        raise ImportError(_error)
    try:
        _module = _jit_build(problem)
    except Exception as err:  # compiler missing, ninja missing, compile error, ...
        _error = f"{problem}, and compiling it on first use failed ({type(err).__name__}: {err}); {REBUILD_HINT}"
        raise ImportError(_error) from err
    return _module


def loaded_extension() -> ModuleType | None:
    """The module if it is loadable without compiling anything, else None."""
    try:
        return load_extension(allow_jit=False)
    except ImportError:
        return None

"""The `extension` backend: our compiled kernels (csrc/) as torch custom ops, `torch.ops.gptfast.*`.

Each kernel op's schema sits beside its CPU kernel (csrc/cpu/<op>.cpp, `TORCH_LIBRARY_FRAGMENT`); the CUDA
kernels register for the same schemas (csrc/cuda/<op>_glue.cpp). What torch.compile and autograd need on the
Python side - a fake (meta) kernel per kernel op and the autograd formula wiring a forward to its backward - and
how a backend calls the kernels live in each op's module (spec.py); this module loads the build, registers them
and gathers the backend functions.
"""
from __future__ import annotations

import functools

import torch

from .. import compiled
from ..compiled import load_extension
from .spec import OPS, compiled_functions, register_kernel_contracts

_C = load_extension()   # ImportError with the reason when it cannot be built or loaded
KERNELS = torch.ops.gptfast
_COMPILED_FOR = set(_C.build_info()["compiled_backends"])   # {"cpu"} or {"cpu", "cuda"}
_SHAPE_ONLY = {"meta"}                                         # served by the fake kernels


def compiled_for(device_type: str) -> bool:
    """Whether this build has kernels for `device_type` ("cpu", "cuda")."""
    return device_type in _COMPILED_FOR


def _on_compiled_device(op, function):
    """The backend function behind a device check: a clear error where this build has no kernels (the
    inference linear layers take PyTorch's own op there instead)."""
    @functools.wraps(function)
    def run(first, *args, **kwargs):
        if first.device.type not in _COMPILED_FOR | _SHAPE_ONLY:
            if op.inference_only and op.torch_twin is not None:
                return op.torch_twin(first, *args, **kwargs)
            raise RuntimeError(f"the extension backend has no {first.device.type} kernels in this build "
                               f"(compiled for: {', '.join(sorted(_COMPILED_FOR))}); use another backend "
                               "or rebuild gptfast with a CUDA toolkit")
        return function(first, *args, **kwargs)
    return run


register_kernel_contracts("gptfast", "extension")
for _name, _function in compiled_functions("gptfast", "extension").items():
    globals()[_name] = _on_compiled_device(OPS[_name], _function)


def supports_kv_cache(device: torch.device) -> bool:
    return True                          # CPU and CUDA kernels take Tk >= Tq (queries = the last positions)


def build_info() -> dict:
    info = dict(_C.build_info())
    info["cpu_isa"] = compiled.cpu_kernels_isa()      # of the CPU kernels in use (AVX-512 ones live apart)
    return info


def set_poison_outputs(on: bool) -> None:
    """NaN-fill kernel outputs before they are written (testing aid), CPU and CUDA kernels alike."""
    compiled.set_poison_outputs(on)

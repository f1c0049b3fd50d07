"""Loading gptfast._C, the compiled C++ extension (csrc/), with a reason when it cannot be had.

The ahead-of-time build (`pip install -e . --no-build-isolation`) leaves `gptfast/_C*.so` (and on
x86-64 `gptfast/_C_avx512*.so`) plus a build record (`_C_build.json`: torch version and a
fingerprint of csrc/). If a module is missing, or stale (csrc/ edited since, or built against
another torch), it is compiled just in time with torch.utils.cpp_extension (once; cached in
TORCH_EXTENSIONS_DIR) unless GPTFAST_JIT=0.

The CPU kernels exist once per instruction set: AVX2 (in gptfast._C) and AVX-512
(gptfast._C_avx512). Loading picks the best one the running CPU has - or the one
GPTFAST_CPU_ISA=avx2|avx512 names, which fails with one line when this CPU lacks it - and
registers its kernels with the dispatcher; `cpu_kernels_isa()` says which.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

from . import _build_meta as meta

REBUILD_HINT = "build it with: pip install -e . --no-build-isolation"
ISA_ORDER = ("avx512", "avx2", "generic")          # best first
_module: ModuleType | None = None
_kernels: ModuleType | None = None                  # the module whose CPU kernels are registered
_error: str | None = None


class CpuIsaError(ImportError):
    """GPTFAST_CPU_ISA names an instruction set this CPU or this build lacks."""


def cpu_flags() -> set[str] | None:
    """The running CPU's feature flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _flags_from_torch() -> set[str]:
    """Without /proc/cpuinfo: the flags implied by the capability ATen itself dispatches to."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability().lower()
    return set(meta.ISA_CPU_FLAGS["avx512"]) if cap.startswith("avx512") else \
        set(meta.ISA_CPU_FLAGS["avx2"]) if cap == "avx2" else set()


def choose_cpu_isa(requested: str | None, flags: set[str], built: list[str]) -> tuple[str, str]:
    """(isa, why): the CPU-kernel build to load. `requested` is GPTFAST_CPU_ISA (None or "" = the
    best this CPU runs), `flags` the CPU's feature flags, `built` the ISAs built here. Raises
    CpuIsaError, in one line, when the requested ISA is unknown, not built, or not supported."""
    def lacks(isa):
        return sorted(set(meta.ISA_CPU_FLAGS[isa]) - flags)

    if requested:
        if requested not in ISA_ORDER:
            raise CpuIsaError(f"GPTFAST_CPU_ISA={requested!r} is not one of {', '.join(ISA_ORDER)}")
        if requested not in built:
            raise CpuIsaError(f"GPTFAST_CPU_ISA={requested} but this build of gptfast has no {requested} kernels "
                              f"(built: {', '.join(built)})")
        if lacks(requested):
            raise CpuIsaError(f"GPTFAST_CPU_ISA={requested} but this CPU lacks {', '.join(lacks(requested))}")
        return requested, f"GPTFAST_CPU_ISA={requested}"
    for isa in ISA_ORDER:
        if isa in built and not lacks(isa):
            return isa, "the best instruction set this CPU and this build have"
    raise CpuIsaError(f"this CPU lacks {', '.join(lacks(built[-1]))}, needed by every CPU-kernel build here "
                      f"({', '.join(built)}); rebuild with GPTFAST_CPU_ISA=generic")


def _prebuilt_problem(name: str = "gptfast._C") -> str | None:
    """Why the ahead-of-time build of module `name` cannot be used, or None when it can."""
    import torch

    if importlib.util.find_spec(name) is None:
        return f"{name} is not built"
    info = meta.read_build_info()
    if info is None:
        return None  # built without a record (e.g. by hand): trust it
    current = meta.source_hash()
    if current is not None and info.get("source_hash") != current:
        return f"{name} is stale: csrc/ changed since it was built"
    if info.get("torch_version") != torch.__version__:
        return f"{name} was built for torch {info.get('torch_version')}, this is torch {torch.__version__}"
    return None


def _jit_build(problem: str, isa: str | None = None) -> ModuleType:
    """Compile gptfast._C (isa None) or the CPU-kernel module for `isa` now."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    src_hash = meta.source_hash()
    if isa is not None:
        name, sources, cflags, cuda, cuda_flags = (meta.ISA_MODULES[isa].replace(".", "_"), meta.isa_sources(),
                                                   meta.cxx_flags(src_hash, isa), False, None)
    else:
        name, sources, cflags, cuda_flags = "gptfast_C", meta.cpu_sources(), meta.cxx_flags(src_hash), None
        cuda, _why = meta.want_cuda(torch.version.cuda, CUDA_HOME, len(meta.cuda_sources()))
        if cuda:
            sources += meta.cuda_sources()
            cflags, cuda_flags = cflags + ["-DGPTFAST_WITH_CUDA"], meta.nvcc_flags()
    what = f"{isa} CPU kernels" if isa else f"C++{'/CUDA' if cuda else ''} extension"
    print(f"gptfast: {problem}; compiling the {what} now (once, then cached; a minute or more)...", file=sys.stderr)
    return load(name=name, sources=[os.path.join(meta.ROOT, s) for s in sources], extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags, extra_ldflags=["-fopenmp"], is_python_module=True, verbose=False)


def _load_module(name: str, isa: str | None, allow_jit: bool) -> ModuleType:
    problem = _prebuilt_problem(name)
    if problem is None:
        return importlib.import_module(name)
    if not allow_jit:
        raise ImportError(f"{problem}; {REBUILD_HINT}")
    if os.environ.get("GPTFAST_JIT", "1") == "0" or not os.path.isdir(meta.CSRC):
        raise ImportError(f"{problem} (and GPTFAST_JIT=0 or no csrc/ to compile); {REBUILD_HINT}")
    try:
        return _jit_build(problem, isa)
    except Exception as err:  # compiler missing, ninja missing, compile error, ...
        raise ImportError(f"{problem}, and compiling it on first use failed ({type(err).__name__}: {err}); "
                          f"{REBUILD_HINT}") from err


def _register_cpu_kernels(base: ModuleType, allow_jit: bool) -> ModuleType:
    """Load the CPU-kernel build for this CPU (base itself, or gptfast._C_avx512) and register it."""
    built = [base.cpu_kernels_isa()] + [isa for isa in meta.extra_isas() if base.cpu_kernels_isa() == "avx2"]
    flags = cpu_flags()
    isa, _why = choose_cpu_isa(os.environ.get("GPTFAST_CPU_ISA"), _flags_from_torch() if flags is None else flags,
                               built)
    kernels = base if isa == base.cpu_kernels_isa() else _load_module(meta.ISA_MODULES[isa], isa, allow_jit)
    if not kernels.cpu_kernels_registered():
        kernels.register_cpu_kernels()
    return kernels


def load_extension(allow_jit: bool = True) -> ModuleType:
    """The compiled module (gptfast._C), its CPU kernels registered for this CPU's instruction set;
    raises ImportError saying why it is unavailable and how to fix it."""
    global _module, _kernels, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise ImportError(_error)
    try:
        base = _load_module("gptfast._C", None, allow_jit)
        _kernels = _register_cpu_kernels(base, allow_jit)
    except ImportError as err:
        if allow_jit or isinstance(err, CpuIsaError):     # a no-JIT probe may be retried with JIT
            _error = str(err)
        raise
    _module = base
    return _module


def loaded_extension() -> ModuleType | None:
    """The module if it is loadable without compiling anything, else None."""
    try:
        return load_extension(allow_jit=False)
    except ImportError:
        return None


def cpu_kernels_isa() -> str:
    """The instruction set of the CPU kernels in use ("avx512", "avx2" or "generic")."""
    load_extension()
    return _kernels.cpu_kernels_isa()


def set_poison_outputs(on: bool) -> None:
    """Make every op kernel fill its outputs with NaN before writing them (a testing aid): the
    switch of gptfast._C (CUDA kernels, the fused loss) and of the CPU kernels in use."""
    load_extension()
    for module in {id(m): m for m in (_module, _kernels)}.values():
        module.set_poison_outputs(on)

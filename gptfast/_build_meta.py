"""How gptfast._C (and gptfast._C_avx512) are built: sources, flags, a fingerprint of the sources, and the record
of what was built (which setup.py reads to reuse a build that is still fresh).

Shared by setup.py (ahead-of-time build) and gptfast/compiled.py (staleness check and the just-in-time
fallback build). Imports nothing but the standard library, so setup.py can load it
without importing the package.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import platform

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PACKAGE_DIR)
CSRC = os.path.join(ROOT, "csrc")
BUILD_INFO_FILE = os.path.join(PACKAGE_DIR, "_C_build.json")


def cpu_sources(root: str = ROOT) -> list[str]:
    """C++ sources of the CPU build, relative to `root`: the kernels with their schemas, the bindings."""
    found = glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp"))
    return sorted(os.path.relpath(p, root) for p in found)


def isa_sources(root: str = ROOT) -> list[str]:
    """Sources of the AVX-512 CPU-kernel module (gptfast._C_avx512): csrc/isa/, one file per kernel
    file of csrc/cpu/ that includes it (distinct object files from the AVX2 build's) and the bindings."""
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "isa", "*.cpp")))


def cuda_sources(root: str = ROOT) -> list[str]:
    """CUDA kernels (csrc/cuda/*.cu) and their torch glue (csrc/cuda/*.cpp), relative to `root`;
    not the standalone check program (test_*.cu, built by CMake)."""
    found = glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp"))
    return sorted(os.path.relpath(p, root) for p in found if not os.path.basename(p).startswith("test_"))


def nvcc_flags() -> list[str]:
    return ["-O3", "-lineinfo", "-DGPTFAST_WITH_CUDA"]


def default_cuda_arch_list(gpu_visible: bool, env=os.environ) -> str | None:
    """TORCH_CUDA_ARCH_LIST to use: the user's; else none (torch targets the visible GPU); else,
    building without a GPU, A100 and H100 (torch would otherwise fail to pick any)."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return env["TORCH_CUDA_ARCH_LIST"]
    return None if gpu_visible else "8.0;9.0"


def want_cuda(torch_cuda: str | None, cuda_home: str | None, n_cuda_sources: int,
              env=os.environ) -> tuple[bool, str]:
    """Whether to add the CUDA sources to the build, and why.

    Default: when torch is a CUDA build and a CUDA toolkit (CUDA_HOME) is found. GPTFAST_SKIP_CUDA=1
    never builds them; GPTFAST_FORCE_CUDA=1 insists (and fails loudly when it cannot).
    """
    if env.get("GPTFAST_SKIP_CUDA") == "1":
        return False, "GPTFAST_SKIP_CUDA=1"
    force = env.get("GPTFAST_FORCE_CUDA") == "1"
    missing = [why for why, bad in (("no csrc/cuda sources", n_cuda_sources == 0),
                                    ("torch is a CPU-only build", torch_cuda is None),
                                    ("no CUDA toolkit (set CUDA_HOME)", cuda_home is None)) if bad]
    if missing and force:
        raise RuntimeError("GPTFAST_FORCE_CUDA=1 but " + "; ".join(missing))
    if missing:
        return False, "; ".join(missing)
    return True, f"CUDA {torch_cuda} at {cuda_home}"


def all_source_files(root: str = ROOT) -> list[str]:
    patterns = ("*.cpp", "*.h", "*.cu", "*.cuh")
    files = []
    for sub in ("", "cpu", "cuda", "isa"):
        for pat in patterns:
            files += glob.glob(os.path.join(root, "csrc", sub, pat))
    return sorted(files)


def source_hash(root: str = ROOT) -> str | None:
    """sha256 (16 hex digits) over every csrc file's path and bytes; None without a csrc/ tree."""
    files = all_source_files(root)
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_isa() -> str:
    """The instruction set of gptfast._C's CPU kernels: AVX2+FMA on x86-64 (every current server, GPU
    hosts included), the generic path elsewhere. GPTFAST_CPU_ISA=generic at build time forces the
    portable build (and no AVX-512 module)."""
    if os.environ.get("GPTFAST_CPU_ISA") == "generic":
        return "generic"
    return "avx2" if is_x86_64() else "generic"


def extra_isas() -> list[str]:
    """Instruction sets built as extra CPU-kernel modules next to gptfast._C: AVX-512 on x86-64 (it
    compiles on any x86-64 machine; it is loaded only on a CPU that has it)."""
    return ["avx512"] if cpu_isa() == "avx2" else []


# ATen's Vectorized<T> picks its implementation from CPU_CAPABILITY_*; -m flags as ATen builds them
ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               # hidden symbols: nothing compiled for AVX-512 can be bound in place of another module's code
               "-fvisibility=hidden", "-fvisibility-inlines-hidden"],
}
# /proc/cpuinfo flags each build needs at run time
ISA_CPU_FLAGS = {"generic": (), "avx2": ("avx2", "fma", "f16c"),
                 "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma")}
ISA_MODULES = {"avx512": "gptfast._C_avx512"}    # the others live in gptfast._C


def cxx_flags(src_hash: str | None, isa: str | None = None) -> list[str]:
    extra_module = isa in ISA_MODULES                 # the AVX-512 module: kernels for schemas gptfast._C defines
    isa = isa or cpu_isa()
    flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"] + ISA_FLAGS[isa]
    if extra_module:
        flags.append("-DGPTFAST_ISA_MODULE")
    if src_hash:
        flags.append(f"-DGPTFAST_SOURCE_HASH_HEX=0x{src_hash}ULL")
    return flags


def write_build_info(torch_version: str, src_hash: str | None, path: str = BUILD_INFO_FILE) -> None:
    """The record of the build now starting; `built` keeps, per module, the build key of the module file
    already in the package folder when it was made by this same build (see record_built)."""
    old = read_build_info(path) or {}
    with open(path, "w") as f:
        json.dump({"torch_version": torch_version, "source_hash": src_hash, "cpu_isa": cpu_isa(),
                   "extra_isas": extra_isas(), "built": old.get("built", {})}, f)


def build_key(module: str, sources: list[str], flags: dict, torch_version: str, src_hash: str | None) -> str:
    """What a compiled module depends on: its sources' fingerprint, its compiler flags and torch's version."""
    text = json.dumps([module, sorted(sources), flags, torch_version, src_hash], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_built(module: str, key: str, path: str = BUILD_INFO_FILE) -> None:
    """Note that the module file now in the package folder was built with `key`."""
    info = read_build_info(path) or {}
    info.setdefault("built", {})[module] = key
    with open(path, "w") as f:
        json.dump(info, f)


def built_key(module: str, path: str = BUILD_INFO_FILE) -> str | None:
    return (read_build_info(path) or {}).get("built", {}).get(module)


def read_build_info(path: str = BUILD_INFO_FILE) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

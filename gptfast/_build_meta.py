"""How gptfast._C is built: sources, flags, and a fingerprint of the sources.

Shared by setup.py (ahead-of-time build), gptfast/ops/extension.py (staleness check and the
just-in-time fallback build). Imports nothing but the standard library, so setup.py can load it
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
    """C++ sources of the CPU build, relative to `root`: the schemas, the kernels, the bindings."""
    found = glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp"))
    return sorted(os.path.relpath(p, root) for p in found)


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
    for sub in ("", "cpu", "cuda"):
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


def cpu_isa() -> str:
    """AVX2+FMA on x86-64 (every current server; GPU hosts included), the generic path elsewhere.

    GPTFAST_CPU_ISA=generic forces the portable build.
    """
    if os.environ.get("GPTFAST_CPU_ISA") == "generic":
        return "generic"
    return "avx2" if platform.machine().lower() in ("x86_64", "amd64") else "generic"


def cxx_flags(src_hash: str | None) -> list[str]:
    flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
    isa = cpu_isa()
    if isa == "avx2":
        # ATen's Vectorized<T> picks its AVX2 implementation from these defines
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    flags += [f"-DGPTFAST_CPU_ISA_{isa.upper()}"]
    if src_hash:
        flags.append(f"-DGPTFAST_SOURCE_HASH_HEX=0x{src_hash}ULL")
    return flags


def write_build_info(torch_version: str, src_hash: str | None, path: str = BUILD_INFO_FILE) -> None:
    with open(path, "w") as f:
        json.dump({"torch_version": torch_version, "source_hash": src_hash, "cpu_isa": cpu_isa()}, f)


def read_build_info(path: str = BUILD_INFO_FILE) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

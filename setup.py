"""Build script for gptfast.

The Python package needs nothing but setuptools, so a plain `pip install -e .` works in pip's
isolated build environment, which cannot import torch (and must not: listing torch as a build
requirement makes pip fetch a multi-GB CUDA build). The compiled extension gptfast._C (csrc/) is
built ahead of time when torch is importable here, i.e. with
`pip install -e . --no-build-isolation`; otherwise gptfast compiles it on first use of the
`extension` backend (cached under TORCH_EXTENSIONS_DIR).

On x86-64 the CPU kernels are built twice: for AVX2 inside gptfast._C and for AVX-512 as
gptfast._C_avx512; gptfast loads the one the running CPU supports (GPTFAST_CPU_ISA=avx2|avx512
forces one). Switches: GPTFAST_SKIP_EXTENSION=1 skips the C++ build; GPTFAST_CPU_ISA=generic
builds portable kernels only (no AVX2/AVX-512 flags); the CUDA sources (csrc/cuda/) are added when torch is a CUDA build and
CUDA_HOME is found, or never with GPTFAST_SKIP_CUDA=1, or always with GPTFAST_FORCE_CUDA=1.
"""
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_build_meta():
    spec = importlib.util.spec_from_file_location("_build_meta", os.path.join(ROOT, "gptfast", "_build_meta.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_modules():
    meta = load_build_meta()
    if os.environ.get("GPTFAST_SKIP_EXTENSION") == "1" or not meta.cpu_sources(ROOT):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("gptfast: torch is not importable at build time; gptfast._C will be compiled on first use "
              "(or now: pip install -e . --no-build-isolation)")
        return [], {}
    src_hash = meta.source_hash(ROOT)
    meta.write_build_info(torch.__version__, src_hash)
    kwargs = dict(name="gptfast._C", sources=meta.cpu_sources(ROOT),
                  extra_compile_args={"cxx": meta.cxx_flags(src_hash)},
                  extra_link_args=["-fopenmp"])
    cuda, why = meta.want_cuda(torch.version.cuda, CUDA_HOME, len(meta.cuda_sources(ROOT)))
    print(f"gptfast: building gptfast._C for CPU{' and CUDA' if cuda else ''} ({why})")
    if cuda:
        arch = meta.default_cuda_arch_list(torch.cuda.is_available())
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        kwargs["sources"] += meta.cuda_sources(ROOT)
        kwargs["extra_compile_args"]["cxx"] += ["-DGPTFAST_WITH_CUDA"]
        kwargs["extra_compile_args"]["nvcc"] = meta.nvcc_flags()
        return ([CUDAExtension(**kwargs)] + isa_extensions(meta, src_hash, CppExtension),
                {"build_ext": BuildExtension})
    return [CppExtension(**kwargs)] + isa_extensions(meta, src_hash, CppExtension), {"build_ext": BuildExtension}


def isa_extensions(meta, src_hash, CppExtension):
    """The CPU kernels again for each extra instruction set (gptfast._C_avx512 on x86-64)."""
    return [CppExtension(name=meta.ISA_MODULES[isa], sources=meta.isa_sources(ROOT),
                         extra_compile_args={"cxx": meta.cxx_flags(src_hash, isa)}, extra_link_args=["-fopenmp"])
            for isa in meta.extra_isas()]


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

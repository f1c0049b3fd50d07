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


def reusing_build_ext(BuildExtension, meta):
    """build_ext that reuses a module already in the package folder when it was built from the same sources,
    flags and torch (the build record's key): the second `pip install -e .` of a fresh clone (the test extras
    after the first line) copies it instead of compiling both CPU builds again. Anything changed: it compiles."""
    import torch

    src_hash = meta.source_hash(ROOT)

    class ReusingBuildExt(BuildExtension):
        def _in_tree(self, ext):
            return os.path.join(ROOT, *ext.name.split(".")[:-1], os.path.basename(self.get_ext_filename(ext.name)))

        def run(self):
            # each module's key from its flags as given (torch's BuildExtension adds its own while building)
            self._keys = {ext.name: meta.build_key(ext.name, ext.sources, ext.extra_compile_args, torch.__version__,
                                                   src_hash) for ext in self.extensions}
            super().run()
            if self.inplace:                # an editable install: the package folder now holds what was built
                for ext in self.extensions:
                    if os.path.isfile(self._in_tree(ext)):
                        meta.record_built(ext.name, self._keys[ext.name])

        def build_extension(self, ext):
            in_tree, target = self._in_tree(ext), self.get_ext_fullpath(ext.name)
            if os.path.isfile(in_tree) and meta.built_key(ext.name) == self._keys[ext.name] \
                    and os.path.abspath(in_tree) != os.path.abspath(target):
                print(f"gptfast: {ext.name} is up to date (same sources, flags and torch): reused, not recompiled")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                self.copy_file(in_tree, target)
                return
            super().build_extension(ext)

    return ReusingBuildExt


ext_modules, cmdclass = extension_modules()
if cmdclass:
    from torch.utils.cpp_extension import BuildExtension
    cmdclass["build_ext"] = reusing_build_ext(BuildExtension, load_build_meta())
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script for gptfast.

The pure-Python package needs nothing but setuptools, so a plain `pip install -e .` works in pip's
isolated build environment, which cannot import torch. The compiled extension (`gptfast._C`,
sources in csrc/) is built only when torch is importable at build time (`pip install -e .
--no-build-isolation`) and sources exist; otherwise the package installs without it and the
`extension` op backend reports itself unavailable. torch is never a build requirement: that would
make pip download a CUDA torch into the isolated environment.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources or os.environ.get("GPTFAST_SKIP_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("gptfast: torch is not importable at build time; skipping the C++ extension "
              "(rebuild with `pip install -e . --no-build-isolation`).")
        return [], {}
    ext = CppExtension(
        name="gptfast._C",
        sources=cpu_sources + sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build decisions (setup.py and the just-in-time fallback share gptfast/_build_meta.py)."""
import os

import pytest

from conftest import ROOT
from gptfast import _build_meta as meta


def test_cpu_sources_cover_kernels_with_their_schemas_and_bindings():
    sources = meta.cpu_sources()
    on_disk = {str(p.relative_to(ROOT)) for p in list((ROOT / "csrc").glob("*.cpp")) + list((ROOT / "csrc" / "cpu").glob("*.cpp"))}
    assert "csrc/bindings.cpp" in sources and on_disk == set(sources)


def test_source_hash_tracks_every_csrc_file(tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    assert meta.source_hash(str(tmp_path)) is None
    f = tmp_path / "csrc" / "cpu" / "k.cpp"
    f.write_text("int a;")
    first = meta.source_hash(str(tmp_path))
    f.write_text("int b;")
    assert meta.source_hash(str(tmp_path)) != first
    (tmp_path / "csrc" / "x.h").write_text("")
    assert len(meta.source_hash(str(tmp_path))) == 16


@pytest.mark.parametrize("torch_cuda,home,n,env,expected", [
    ("13.0", "/cuda", 2, {}, True),
    (None, "/cuda", 2, {}, False),                       # CPU torch
    ("13.0", None, 2, {}, False),                        # no toolkit
    ("13.0", "/cuda", 0, {}, False),                     # no .cu sources yet
    ("13.0", "/cuda", 2, {"GPTFAST_SKIP_CUDA": "1"}, False),
])
def test_want_cuda(torch_cuda, home, n, env, expected):
    assert meta.want_cuda(torch_cuda, home, n, env)[0] is expected


def test_force_cuda_fails_loudly_when_impossible():
    with pytest.raises(RuntimeError, match="GPTFAST_FORCE_CUDA=1 but torch is a CPU-only build"):
        meta.want_cuda(None, "/cuda", 2, {"GPTFAST_FORCE_CUDA": "1"})


def test_isa_flags_only_on_x86(monkeypatch):
    monkeypatch.setattr(meta.platform, "machine", lambda: "aarch64")
    assert not any(f.startswith("-mavx") for f in meta.cxx_flags(None))
    monkeypatch.setattr(meta.platform, "machine", lambda: "x86_64")
    assert "-mavx2" in meta.cxx_flags(None)
    assert meta.extra_isas() == ["avx512"] and "-mavx512f" in meta.cxx_flags(None, "avx512")
    assert "-mavx512f" not in meta.cxx_flags(None)                 # gptfast._C itself stays AVX2
    monkeypatch.setenv("GPTFAST_CPU_ISA", "generic")
    assert "-mavx2" not in meta.cxx_flags(None) and meta.extra_isas() == []
    monkeypatch.setattr(meta.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("GPTFAST_CPU_ISA")
    assert meta.extra_isas() == []


def test_every_cpu_kernel_file_has_an_avx512_build():
    """csrc/isa/ compiles each kernel file of csrc/cpu/ again for AVX-512 (plus the module's bindings);
    a kernel file without its wrapper would leave gptfast._C_avx512 with an unresolved symbol."""
    kernels = {os.path.basename(p) for p in meta.cpu_sources() if p.startswith("csrc/cpu/")} - {"bpe_train.cpp"}
    isa = set(meta.isa_sources())
    assert {f"csrc/isa/avx512_{k}" for k in kernels} | {"csrc/isa/module.cpp"} == isa
    for k in kernels:
        with open(os.path.join(meta.ROOT, "csrc", "isa", f"avx512_{k}")) as f:
            assert f'#include "../cpu/{k}"' in f.read()


def test_cuda_sources_exclude_the_standalone_test_program():
    sources = meta.cuda_sources()
    on_disk = {str(p.relative_to(ROOT)) for ext in ("*.cu", "*.cpp") for p in (ROOT / "csrc" / "cuda").glob(ext)}
    assert set(sources) == {s for s in on_disk if not s.startswith("csrc/cuda/test_")} and sources
    assert not any("test_" in s for s in sources)


def test_default_cuda_arch_list():
    assert meta.default_cuda_arch_list(False, {}) == "8.0;9.0"
    assert meta.default_cuda_arch_list(True, {}) is None
    assert meta.default_cuda_arch_list(False, {"TORCH_CUDA_ARCH_LIST": "9.0a"}) == "9.0a"


def test_wheel_ships_the_default_corpus_and_gpt2_bpe_files(tmp_path):
    """What the product needs offline is package data: in the wheel, not only in the source tree."""
    import os
    import subprocess
    import sys
    import zipfile

    from conftest import ROOT

    env = {**os.environ, "GPTFAST_SKIP_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("gptfast-*.whl")
    sizes = {i.filename: i.file_size for i in zipfile.ZipFile(wheel).infolist()}
    for name in ["gptfast/data/corpora/the-verdict.txt", "gptfast/tokenizer/gpt2/vocab.bpe",
                 "gptfast/tokenizer/gpt2/encoder.json"]:
        assert sizes.get(name) == (ROOT / name).stat().st_size, name


def test_cmake_builds_every_cuda_kernel_file_and_its_glue():
    """CMakeLists.txt takes the CUDA kernel files and the torch glue by pattern (csrc/cuda/*.cu but the test_*
    program, csrc/cuda/*.cpp): a new op's files need no line there."""
    from conftest import ROOT

    text = (ROOT / "CMakeLists.txt").read_text()
    assert "file(GLOB GPTFAST_CUDA_SOURCES CONFIGURE_DEPENDS csrc/cuda/*.cu)" in text
    assert "file(GLOB GPTFAST_CUDA_GLUE CONFIGURE_DEPENDS csrc/cuda/*.cpp)" in text
    assert "add_library(gptfast_cuda_kernels STATIC ${GPTFAST_CUDA_SOURCES})" in text


def test_every_kernel_op_schema_sits_beside_its_cpu_kernel():
    """Each schema is declared by a TORCH_LIBRARY_FRAGMENT in the file of its kernel (not a central list), and
    only outside the AVX-512 module's build (which includes the same files)."""
    import re

    from conftest import ROOT

    files = sorted((ROOT / "csrc").glob("**/*.cpp"))
    assert not any("TORCH_LIBRARY(gptfast" in f.read_text() for f in files)
    declared = {}
    for f in files:
        for block in re.findall(r"TORCH_LIBRARY_FRAGMENT\(gptfast, m\) \{(.*?)\n\}", f.read_text(), re.S):
            for name in re.findall(r'm\.def\("(\w+)\(', block):
                declared[name] = f.relative_to(ROOT).as_posix()
    for name, where in declared.items():
        text = (ROOT / where).read_text()
        assert f'm.impl("{name}"' in text, f"{name}: declared in {where}, its CPU kernel registered elsewhere"
        if where.startswith("csrc/cpu/"):
            assert "#ifndef GPTFAST_ISA_MODULE" in text
    from gptfast.ops import OPS
    kernel_ops = {k for op in OPS.values() for k in op.kernels}
    assert kernel_ops <= set(declared), kernel_ops - set(declared)

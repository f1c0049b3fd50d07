"""The CUDA kernels run without a GPU: compiled with g++ against the emulation headers in
tests/cuda_emulation/include (blocks as CPU threads, WMMA tiles, barriers, warp shuffles) and
checked against float64 references. Catches indexing, masking, synchronization and layout bugs
on every machine; speed and the real hardware's rounding are for the GPU tests."""
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow     # the second tier (.ci/run): subprocess runs, minutes in all

EMU = ROOT / "tests" / "cuda_emulation"
CXX = shutil.which("g++")


FLAGS = ["-std=c++20", "-O1", "-pthread", "-D__CUDA_ARCH__=800", "-DGPTFAST_CUDA_EMULATION", f"-I{EMU / 'include'}"]
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>]*>)?)<<<(.*?)>>>\(", re.S)   # kernel<T><<<config>>>(
DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")


def build_and_run(source: str, exe) -> subprocess.CompletedProcess:
    built = subprocess.run([CXX, *FLAGS, "-DGPTFAST_KERNELS_ONLY", str(source), "-o", str(exe)], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-4000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)


def emulation_source(cu: str) -> str:
    """A .cu file as plain C++ for the emulation: launches become emu::launch_kernel calls, static
    __shared__ arrays become function statics (one per kernel, shared by the block's threads), and
    the dynamic shared array gets a definition (the translation unit's own)."""
    text = LAUNCH.sub(lambda m: f"emu::launch_kernel({m.group(2)}, {m.group(1)}, ", cu)
    dynamic = set(DYNAMIC_SHARED.findall(text))
    text = text.replace("extern __shared__", "extern").replace("__shared__", "static")
    for ctype, name in dynamic:   # declared at block scope inside gptfast::cuda's anonymous namespace
        text += ("\nnamespace gptfast { namespace cuda { namespace { "
                 f"alignas(128) {ctype} {name}[256 * 1024 / sizeof({ctype})]; }} }} }}\n")
    return text


def test_rewriting_kernel_launches():
    src = "  k<T, 4><<<dim3(static_cast<unsigned>(n), 2), 128, bytes, s>>>(a, b);\n  g<<<1, 32, 0, s>>>(c);"
    assert emulation_source(src) == ("  emu::launch_kernel(dim3(static_cast<unsigned>(n), 2), 128, bytes, s, k<T, 4>, a, b);"
                                     "\n  emu::launch_kernel(1, 32, 0, s, g, c);")


@pytest.mark.skipif(CXX is None, reason="no g++ to build the emulation")
def test_tensor_core_attention_kernels_in_emulation(tmp_path):
    run = build_and_run(EMU / "attention_tc_emulated.cpp", tmp_path / "attention_tc")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all emulated kernels within tolerance" in run.stdout
    assert run.stdout.count(" ok\n") == 7


@pytest.mark.skipif(CXX is None, reason="no g++ to build the emulation")
def test_every_cuda_kernel_passes_the_standalone_check_in_emulation(tmp_path):
    """csrc/cuda/test_kernels.cu (the GPU's standalone check, CPU references side by side) built
    against every kernel file: LayerNorm, RMSNorm, GELU, SwiGLU, RoPE, cross-entropy, both attention
    implementations (grouped-query included)."""
    sources = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        out = tmp_path / f"{cu.stem}.cpp"
        out.write_text(f'#line 1 "{cu}"\n' + emulation_source(cu.read_text()))
        sources.append(out)
    flags = FLAGS + [f"-I{ROOT / 'csrc' / 'cuda'}"]

    def compile_one(src):
        return subprocess.run([CXX, *flags, "-c", str(src), "-o", str(src.with_suffix(".o"))], capture_output=True,
                              text=True, timeout=300)
    with ThreadPoolExecutor(2) as pool:
        for src, built in zip(sources, pool.map(compile_one, sources)):
            assert built.returncode == 0, f"{src.name}: {built.stderr[-4000:]}"
    exe = tmp_path / "gptfast_cuda_test"
    linked = subprocess.run([CXX, "-pthread", *[str(s.with_suffix(".o")) for s in sources], "-o", str(exe)],
                            capture_output=True, text=True, timeout=300)
    assert linked.returncode == 0, linked.stderr[-4000:]
    for simt in (False, True):   # the tensor-core attention for fp16/bf16, then the plain kernels for all
        env = {"GPTFAST_CUDA_ATTENTION": "simt"} if simt else {}
        run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0 and "all kernels within tolerance" in run.stdout, run.stdout + run.stderr
        assert run.stdout.count(" FAIL ") == 0 and run.stdout.count("ok  ") >= 30
        gqa = [line for line in run.stdout.splitlines() if " GQA " in line]     # grouped-query: fp32 and bf16 checks
        assert len(gqa) == 4 and all("ok  " in line for line in gqa), run.stdout
        assert run.stdout.count("ok  ") >= 70                   # every kernel's lines (the new ops' included)
        dots = [line for line in run.stdout.splitlines() if line.startswith("linear_")]
        assert len(dots) == 6 and all("ok  " in line for line in dots), run.stdout   # the integer dot products

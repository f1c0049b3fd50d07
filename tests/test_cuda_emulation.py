"""The CUDA kernels run without a GPU: compiled with g++ against the emulation headers in
tests/cuda_emulation/include (blocks as CPU threads, WMMA tiles, barriers, warp shuffles) and
checked against float64 references. Catches indexing, masking, synchronization and layout bugs
on every machine; speed and the real hardware's rounding are for the GPU tests."""
import shutil
import subprocess

import pytest

from conftest import ROOT

EMU = ROOT / "tests" / "cuda_emulation"
CXX = shutil.which("g++")


def build_and_run(source: str, exe, *defines: str) -> subprocess.CompletedProcess:
    flags = ["-std=c++20", "-O1", "-pthread", "-D__CUDA_ARCH__=800", "-DGPTFAST_CUDA_EMULATION", *defines,
             f"-I{EMU / 'include'}"]
    built = subprocess.run([CXX, *flags, str(source), "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-4000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(CXX is None, reason="no g++ to build the emulation")
def test_tensor_core_attention_kernels_in_emulation(tmp_path):
    run = build_and_run(EMU / "attention_tc_emulated.cpp", tmp_path / "attention_tc")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all emulated kernels within tolerance" in run.stdout
    assert run.stdout.count(" ok\n") == 7

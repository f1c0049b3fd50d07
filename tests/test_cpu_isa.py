"""The CPU kernels per instruction set: AVX2 (in gptfast._C) and AVX-512 (gptfast._C_avx512), one
of them registered per process, chosen from the running CPU or forced with GPTFAST_CPU_ISA."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from gptfast import _build_meta as meta
from gptfast.compiled import CpuIsaError, choose_cpu_isa, cpu_flags, cpu_kernels_isa

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}
BUILT = ["avx2", "avx512"]


@pytest.mark.parametrize("flags,expected", [(AVX512, "avx512"), (AVX2, "avx2"),
                                            (AVX512 - {"avx512bw"}, "avx2")])  # AVX-512F alone is not enough
def test_default_is_the_best_isa_the_cpu_has(flags, expected):
    assert choose_cpu_isa(None, flags, BUILT)[0] == expected
    assert choose_cpu_isa("", flags, BUILT)[0] == expected


def test_forcing_an_isa():
    assert choose_cpu_isa("avx2", AVX512, BUILT) == ("avx2", "GPTFAST_CPU_ISA=avx2")
    assert choose_cpu_isa("avx512", AVX512, BUILT)[0] == "avx512"
    assert choose_cpu_isa(None, AVX512, ["avx2"])[0] == "avx2"        # built without the AVX-512 module
    assert choose_cpu_isa(None, set(), ["generic"])[0] == "generic"


@pytest.mark.parametrize("requested,flags,built,says", [
    ("avx512", AVX2, BUILT, "GPTFAST_CPU_ISA=avx512 but this CPU lacks avx512bw, avx512dq, avx512f, avx512vl"),
    ("avx2", {"sse4_2"}, BUILT, "GPTFAST_CPU_ISA=avx2 but this CPU lacks avx2, f16c, fma"),
    ("avx512", AVX512, ["avx2"], "this build of gptfast has no avx512 kernels (built: avx2)"),
    ("sse", AVX512, BUILT, "GPTFAST_CPU_ISA='sse' is not one of avx512, avx2, generic"),
    (None, {"sse4_2"}, ["avx2"], "this CPU lacks avx2, f16c, fma, needed by every CPU-kernel build here"),
])
def test_impossible_choices_are_one_line_errors(requested, flags, built, says):
    with pytest.raises(CpuIsaError) as err:
        choose_cpu_isa(requested, flags, built)
    assert says in str(err.value) and "\n" not in str(err.value)


def _supported(isa: str) -> bool:
    flags = cpu_flags()
    return flags is not None and set(meta.ISA_CPU_FLAGS[isa]) <= flags


def test_this_process_uses_the_best_isa_it_can():
    if os.environ.get("GPTFAST_CPU_ISA"):
        pytest.skip(f"GPTFAST_CPU_ISA={os.environ['GPTFAST_CPU_ISA']} forces the choice in this run")
    want = "avx512" if _supported("avx512") and "avx512" in meta.extra_isas() else "avx2"
    assert cpu_kernels_isa() == want


# Runs in a fresh interpreter with GPTFAST_CPU_ISA set: every op's cases (from its module) through the extension
# against the float64 reference, outputs and gradients (compare's own check), and the ISA the kernels report.
CHECK = r"""
import torch
from gptfast.compare.op_check import compare_ops, op_cases
from gptfast.compiled import cpu_kernels_isa
rows = compare_ops(op_cases(quick=True), ["extension"], torch.float32, torch.device("cpu"), progress=False)
failed = [f"{r.name} {r.case} {r.quantity} {r.rel}" for r in rows if r.status == "FAIL"]
print(cpu_kernels_isa(), sum(r.status == "PASS" for r in rows), len(failed), "; ".join(failed))
"""


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_forced_isa_runs_correct_kernels_or_says_why_not(isa):
    """Where the CPU has the ISA: the ops match the float64 reference under it. Where it lacks it:
    a training run asking for the extension stops with one line naming the missing flags."""
    env = dict(os.environ, GPTFAST_CPU_ISA=isa)
    if not meta.is_x86_64():
        pytest.skip("AVX2/AVX-512 builds exist on x86-64 only")
    if _supported(isa):
        run = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr
        got_isa, passed, failed = run.stdout.split()[:3]
        assert got_isa == isa and int(passed) > 100 and failed == "0", run.stdout
    else:
        run = subprocess.run([sys.executable, "scripts/train.py", "--backend", "extension", "--max-steps", "1"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 2
        assert "Traceback" not in run.stderr
        assert f"GPTFAST_CPU_ISA={isa} but this CPU lacks" in run.stderr.strip().splitlines()[-1]


def test_just_in_time_build_of_the_avx512_module(monkeypatch):
    """Without an ahead-of-time build, the AVX-512 module is compiled on first use from csrc/isa/ with
    the AVX-512 flags, as a module of its own (nothing is compiled here: `load` is stood in for)."""
    import torch.utils.cpp_extension as cpp
    from gptfast import compiled

    seen = {}
    monkeypatch.setattr(cpp, "load", lambda **kw: seen.update(kw) or "module")
    assert compiled._jit_build("gptfast._C_avx512 is not built", "avx512") == "module"
    assert seen["name"] == "gptfast__C_avx512" and seen["is_python_module"]
    assert sorted(os.path.relpath(s, meta.ROOT) for s in seen["sources"]) == meta.isa_sources()
    assert {"-mavx512f", "-DCPU_CAPABILITY_AVX512", "-fvisibility=hidden"} <= set(seen["extra_cflags"])
    assert not any("cuda" in s for s in seen["sources"])

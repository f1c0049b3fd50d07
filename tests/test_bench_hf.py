"""benchmarks/bench_hf.py on a one-layer GPT-2: each configuration's worker runs (in this process, to keep
the suite short; the script runs each in its own) and lands in the table (the timings themselves are the
benchmark's business, not a test's)."""
import argparse
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("transformers", reason="bench_hf needs the `transformers` test extra", exc_type=ImportError)
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_hf  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "qwen3-tiny"])
def test_every_configuration_runs_and_lands_in_the_table(model):
    args = argparse.Namespace(device="cpu", layers=1, seq=32, batch=2, steps=1, warmup=1, backend="extension",
                              dtype="float32", rounds=1, model=model)
    pooled = {}
    for config in bench_hf.CONFIGS[:3]:
        res = bench_hf.worker(argparse.Namespace(**vars(args), worker=config))
        assert len(res["step_s"]) == 1 and res["peak_mb"] > 0 and len(res["losses"]) == 2
        pooled[config] = {"step_s": res["step_s"], "peak_mb": [res["peak_mb"]], "losses": res["losses"],
                          "above_state_mb": [res["above_state_mb"]]}
    # the same model and data: the first loss agrees (GPT-2: dropout draws differ between SDPA and our kernels)
    assert pooled["unpatched"]["losses"][0] == pytest.approx(pooled["patched"]["losses"][0], rel=0.02)
    env = bench_hf.environment(args)
    rows, table = bench_hf.table(env, pooled)
    assert [r["config"] for r in rows] == ["unpatched", "attention", "patched"] and rows[0]["speedup_vs_unpatched"] == 1
    assert rows[0]["above_state_vs_unpatched"] == 1
    assert "| patched |" in table and env["device"]
    assert ("n_layer=1" if model == "gpt2" else "qwen3-tiny preset") in table


def test_bench_hf_refuses_an_unknown_configuration():
    done = subprocess.run([sys.executable, "benchmarks/bench_hf.py", "--configs", "unpatched,fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown ['fast']" in done.stderr

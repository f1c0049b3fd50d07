"""The benchmark's code paths at tiny sizes, so they cannot rot, and its work counts by hand."""
import json
import math
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ops  # noqa: E402
from gptfast import ops  # noqa: E402
from gptfast.ops import OPS  # noqa: E402


def work(key, shape, dtype, mode):
    return bench_ops.find_bench(key, shape)[1].work(dtype, mode)


def test_work_counts_by_hand():
    """Each op module's count of one call's bytes or FLOPs."""
    f32 = torch.float32
    assert work("layer_norm", (8, 768), f32, "fwd") == 2 * 8 * 768 * 4
    assert work("gelu", (8, 768), f32, "fwd+bwd") == 2 * 2 * 8 * 768 * 4
    assert work("cross_entropy", (4, 50257), f32, "fwd") == 4 * 50257 * 4
    # B=8, H=12, T=1024, D=64: 4 * 96 * 1024^2 * 64 / 2 = 12.88 GFLOP forward, x3.5 with the backward
    assert work("attention", (8, 12, 1024, 64), f32, "fwd") == 12_884_901_888
    assert work("attention_dropout", (8, 12, 1024, 64), f32, "fwd+bwd") == 12_884_901_888 * 3.5


@pytest.mark.parametrize("key,shape", [("layer_norm", (4, 32)), ("gelu", (3, 40)), ("attention", (1, 2, 20, 16)),
                                       ("cross_entropy", (3, 50))])
def test_run_case_rows(key, shape):
    op, bench = bench_ops.find_bench(key, shape)
    rows = bench_ops.run_case(op, bench, "fwd+bwd", torch.device("cpu"), torch.float32, 1,
                              ["reference", "torch", "extension", "triton"])
    assert [r["backend"] for r in rows] == ["reference", "torch", "extension", "triton"]
    for r in rows:
        assert r["median_ms"] > 0 and r["throughput"] > 0 and r["max_rel_error"] < 1e-5
        assert set(r) >= {"op", "mode", "shape", "dtype", "unit", "speedup_vs_reference"}


def test_linear_work_and_rows():
    """Bytes of a decoding linear layer: the weights in their storage type (+ int8 scales), x, bias, y."""
    f32 = torch.float32
    M, K, N = 2, 768, 3072
    activations = (M * K + N + M * N) * 4
    assert work("linear", (M, K, N), f32, "fwd") == N * K * 4 + activations
    assert work("linear_bf16", (M, K, N), f32, "fwd") == N * K * 2 + activations
    assert work("linear_int8", (M, K, N), f32, "fwd") == N * K + N * 4 + activations
    op, bench = bench_ops.find_bench("linear_int8", (3, 64, 40))
    rows = bench_ops.run_case(op, bench, "fwd", torch.device("cpu"), f32, 2, ["reference", "torch", "extension"])
    assert [r["backend"] for r in rows] == ["reference", "torch", "extension"]
    assert all(r["mode"] == "fwd" and r["max_rel_error"] < 1e-5 and r["throughput"] > 0 for r in rows)


def test_percentiles():
    assert bench_ops.percentiles([5, 1, 4, 2, 3]) == (3, 2, 4)


def test_quick_run_writes_json(tmp_path, monkeypatch):
    out = tmp_path / "b.json"
    monkeypatch.setattr(bench_ops, "peak_memory_mb", lambda *a: 1.0)      # no subprocesses here
    monkeypatch.setattr(bench_ops, "measure_ceilings",
                        lambda *a: {"copy_GBps": 10.0, "matmul_GFLOPps": 100.0, "matmul": "2048^3 float32"})
    bench_ops.main(["--quick", "--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"device", "torch", "date", "ceilings", "backends"} <= set(data["environment"])
    ops_seen = {r["op"] for r in data["results"]}
    inference = tuple(op.name for op in OPS.values() if op.inference_only and op.bench)   # forward only
    trained = tuple(k for k in bench_ops.table_keys() if k not in inference)
    assert ops_seen == set(bench_ops.table_keys())
    table = (tmp_path / "b.md").read_text()
    assert table.count("\n| ") >= 6 * 2 * 3 and "| attention | fwd+bwd |" in table
    assert "| linear_cross_entropy | fwd+bwd | 256×64×4096 | extension |" in table
    assert sorted(p.name for p in tmp_path.glob("b_*.png")) == sorted(
        [f"b_{op}_{mode}.png" for op in trained for mode in ("fwd", "fwd_bwd")] + [f"b_{op}_fwd.png" for op in inference])
    memory = {(r["op"], r["backend"]) for r in data["results"] if r["mode"] == "peak_memory"}
    assert {("attention", "extension"), ("linear_cross_entropy", "extension"), ("linear_cross_entropy", "torch")} <= memory
    for r in data["results"]:
        if r["mode"] == "peak_memory":
            continue
        if r["op"] == "linear_cross_entropy" and r["backend"] == "reference":
            assert math.isnan(r["median_ms"]) and r["max_rel_error"] < 1e-5   # run once for its error, not timed
        else:
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]


def test_simt_row_runs_the_extension_with_the_plain_kernels_switch(monkeypatch):
    seen = []
    real = ops.get_backend("extension").causal_attention
    monkeypatch.setattr(ops.get_backend("extension"), "causal_attention",
                        lambda *a, **k: seen.append(os.environ.get("GPTFAST_CUDA_ATTENTION")) or real(*a, **k))
    monkeypatch.delenv("GPTFAST_CUDA_ATTENTION", raising=False)
    op, bench = bench_ops.find_bench("attention", (1, 2, 9, 16))
    rows = bench_ops.run_case(op, bench, "fwd", torch.device("cpu"), torch.float32, 1, ["reference", "extension-simt"])
    assert [r["backend"] for r in rows] == ["reference", "extension-simt"] and rows[1]["max_rel_error"] < 1e-5
    assert seen and set(seen) == {"simt"}                            # the simt row sets the switch...
    assert "GPTFAST_CUDA_ATTENTION" not in os.environ   # ...and puts it back
    gelu_op, gelu_bench = bench_ops.find_bench("gelu", (2, 8))
    assert bench_ops.implementation(gelu_op, gelu_bench, "extension-simt") is None   # an attention-only row


@pytest.mark.slow
def test_given_shapes_replace_the_defaults(tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    monkeypatch.setattr(bench_ops, "measure_ceilings",
                        lambda *a: {"copy_GBps": 10.0, "matmul_GFLOPps": 100.0, "matmul": "2048^3 float32"})
    bench_ops.main(["--ops", "gelu,dropout_add", "--shape", "gelu=4x8", "--shape", "gelu=3x5", "--repeats", "1",
                    "--backends", "torch,extension", "--no-plots", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert sorted({tuple(r["shape"]) for r in rows if r["op"] == "gelu"}) == [(3, 5), (4, 8)]
    assert {tuple(r["shape"]) for r in rows if r["op"] == "dropout_add"} == {(2048, 768), (8192, 768)}
    with pytest.raises(SystemExit):
        bench_ops.main(["--shape", "nope=1x2", "--out", str(out)])

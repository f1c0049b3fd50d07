"""The benchmark's code paths at tiny sizes, so they cannot rot, and its work counts by hand."""
import json
import math
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ops  # noqa: E402
from conftest import ROOT  # noqa: E402
from gptfast.ops import OPS  # noqa: E402


# the ops are read from gptfast.ops.OPS (this file names none); each op's own work count is checked in its file
TRAINED = [key for op in OPS.values() if not op.inference_only and op.bench for key in op.table_keys]
INFERENCE = [op.name for op in OPS.values() if op.inference_only and op.bench]


def quick_shape(key):
    op = next(op for op in OPS.values() if key in op.table_keys and op.bench)
    return op.bench_shapes("cpu", True, False)[key][0]


@pytest.mark.parametrize("key", TRAINED + INFERENCE)
def test_run_case_rows(key):
    """Every op's quick shape: the rows of each backend, timed, with the error against float64."""
    op, bench = bench_ops.find_bench(key, quick_shape(key))
    mode = "fwd" if op.inference_only else "fwd+bwd"
    rows = bench_ops.run_case(op, bench, mode, torch.device("cpu"), torch.float32, 1, ["reference", "torch", "extension"])
    assert [r["backend"] for r in rows] == ["reference", "torch", "extension"]
    for r in rows:
        assert r["median_ms"] > 0 or not bench.time_reference
        assert math.isnan(r["max_rel_error"]) and bench.random and r["backend"] == "torch" or r["max_rel_error"] < 1e-5
        assert set(r) >= {"op", "mode", "shape", "dtype", "unit", "speedup_vs_reference"}


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
    inference, trained = INFERENCE, TRAINED
    assert ops_seen == set(bench_ops.table_keys())
    table = (tmp_path / "b.md").read_text()
    assert table.count("\n| ") >= len(TRAINED) * 2 * 3 and f"| {TRAINED[0]} | fwd+bwd |" in table
    assert {r["mode"] for r in data["results"] if r["op"] in inference} == {"fwd"}
    assert {m for op in trained for m in ("fwd", "fwd+bwd")} <= {r["mode"] for r in data["results"] if r["op"] in trained}
    assert not list(tmp_path.glob("*.png"))                     # pictures: benchmarks/plot.py, from the committed JSON
    memory = {(r["op"], r["backend"]) for r in data["results"] if r["mode"] == "peak_memory"}
    asks = [key for key in TRAINED if bench_ops.find_bench(key, quick_shape(key))[1].peak_memory]
    assert asks and {(key, b) for key in asks for b in ("torch", "extension")} <= memory
    for r in data["results"]:
        if r["mode"] == "peak_memory":
            continue
        if r["backend"] == "reference" and not bench_ops.find_bench(r["op"], r["shape"])[1].time_reference:
            assert math.isnan(r["median_ms"]) and r["max_rel_error"] < 1e-5   # run once for its error, not timed
        else:
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]


@pytest.mark.slow
def test_given_shapes_replace_the_defaults(tmp_path, monkeypatch):
    out = tmp_path / "s.json"
    monkeypatch.setattr(bench_ops, "measure_ceilings",
                        lambda *a: {"copy_GBps": 10.0, "matmul_GFLOPps": 100.0, "matmul": "2048^3 float32"})
    given = next(op.name for op in OPS.values() if op.elementwise)
    other = next(op.name for op in OPS.values() if op.drops_out == (op.name,))
    bench_ops.main(["--ops", f"{given},{other}", "--shape", f"{given}=4x8", "--shape", f"{given}=3x5", "--repeats", "1",
                    "--backends", "torch,extension", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert sorted({tuple(r["shape"]) for r in rows if r["op"] == given}) == [(3, 5), (4, 8)]
    assert {tuple(r["shape"]) for r in rows if r["op"] == other} == {tuple(s) for s in
                                                                      OPS[other].bench_shapes("cpu", False, False)[other]}
    with pytest.raises(SystemExit):
        bench_ops.main(["--shape", "nope=1x2", "--out", str(out)])


def test_the_pictures_regenerate_from_the_committed_results_and_are_all_linked(tmp_path):
    """benchmarks/plot.py draws every picture of the README and docs/ from benchmarks/results/ in one command;
    every PNG in the repository is one of them and is shown somewhere."""
    import plot

    assert plot.main(["--out", str(tmp_path)]) == 0
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(drawn) == len(plot.FIGURES) and all((tmp_path / n).stat().st_size > 10_000 for n in drawn)
    committed = sorted(p.name for p in (ROOT / "docs" / "images").glob("*.png"))
    assert committed == drawn
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    pngs = [p for p in ROOT.rglob("*.png") if not {".venv", "build", "runs", ".git"} & set(p.relative_to(ROOT).parts)]
    unlinked = [str(p.relative_to(ROOT)) for p in pngs if p.name not in text]
    assert not unlinked, f"PNGs nothing links: {unlinked}"

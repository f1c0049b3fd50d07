"""benchmarks/bench_hf.py, smoke-run on a one-layer GPT-2: every configuration runs in its own process and
lands in the table and the JSON (the timings themselves are the benchmark's business, not a test's)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("transformers", reason="bench_hf needs the `transformers` test extra", exc_type=ImportError)


def test_bench_hf_smoke_run_writes_every_configuration(tmp_path):
    stem = tmp_path / "hf"
    done = subprocess.run([sys.executable, "benchmarks/bench_hf.py", "--layers", "1", "--seq", "32", "--steps", "1",
                           "--warmup", "0", "--rounds", "1", "--backend", "extension", "--out", str(stem)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "hf.json").read_text())["results"]
    assert [r["config"] for r in rows] == ["unpatched", "attention", "patched"]
    assert all(r["median_step_s"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert rows[0]["first_losses"] == pytest.approx(rows[2]["first_losses"], rel=0.05)   # same model, same data
    table = (tmp_path / "hf.md").read_text()
    assert "| patched |" in table and "n_layer=1" in table


def test_bench_hf_refuses_an_unknown_configuration():
    done = subprocess.run([sys.executable, "benchmarks/bench_hf.py", "--configs", "unpatched,fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown ['fast']" in done.stderr

"""The `auto` backend: per-op choices from the shipped, measured table."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gptfast import ops
from gptfast.ops import OPS, auto

sys.path.insert(0, str(ROOT / "benchmarks"))
import make_auto_table  # noqa: E402


# examples picked by what the ops declare (this file names none): an elementwise op, a row-wise one, one whose
# table keys tell its calls with and without dropout apart, the one whose point is memory
ELEMENTWISE = next(op for op in OPS.values() if op.elementwise)
ROWWISE = next(op for op in OPS.values() if op.rowwise and not op.elementwise and not op.inference_only)
DROPPING = next(op for op in OPS.values() if op.drops_out and len(op.table_keys) > 1)
PLAIN_KEY, DROP_KEY = [k for k in DROPPING.table_keys if k not in DROPPING.drops_out][0], DROPPING.drops_out[0]
MEMORY_FIRST = next(op for op in OPS.values() if op.memory_first)


def row(op, ranking, device="cpu", dtype="float32"):
    return {"op": op, "device": device, "dtype": dtype, "shapes": "2048x768", "measured_on": "Test CPU",
            "date": "2026-12-01", "ranking": [{"backend": b, "vs_torch": x, "cases": 1} for b, x in ranking]}


@pytest.fixture
def table(monkeypatch):
    """Swap in a table of our own; the memo of earlier choices is cleared before and after."""
    def use(rows):
        monkeypatch.setattr(auto, "_TABLE", {"rows": rows})
        auto.forget_choices()
    yield use
    auto.forget_choices()


def test_choice_follows_the_ranking_and_names_its_evidence(table):
    table([row(ELEMENTWISE.name, [("triton", 9.0), ("extension", 1.4), ("torch", 1.0)]),
           row(ROWWISE.name, [("torch", 1.0), ("extension", 1.01)]),
           row(DROP_KEY, [("extension", 3.0), ("torch", 1.0)])])
    first = auto.choose(ELEMENTWISE.name, "cpu", "float32")
    assert first.backend == "extension"                              # never Triton's CPU interpreter
    assert "1.40x torch" in first.reason and "Test CPU" in first.reason and "2026-12-01" in first.reason
    assert auto.choose(ROWWISE.name, "cpu", "float32").backend == "torch"
    assert auto.choose(DROP_KEY, "cpu", "float32").backend == "extension"
    missing = auto.choose(PLAIN_KEY, "cuda", "bfloat16")
    assert missing.backend == "torch" and "no measurement for cuda bfloat16" in missing.reason


def test_auto_computes_what_the_chosen_backend_computes(table, capsys):
    """Each call goes where its table row says - the row of the call's own key (with or without dropout)."""
    table([row(ELEMENTWISE.name, [("extension", 1.4), ("torch", 1.0)]), row(PLAIN_KEY, [("torch", 1.0)]),
           row(DROP_KEY, [("extension", 3.0), ("torch", 1.0)])])
    x = torch.randn(64, 96)
    assert torch.equal(ELEMENTWISE.rowwise("auto", x), ELEMENTWISE.rowwise("extension", x))
    for case in DROPPING.cases(True):
        leaves = {n: t.float() for n, t in case.build(torch.Generator().manual_seed(0)).items()}
        chosen = "extension" if case.random else "torch"
        assert torch.equal(case.call("auto", leaves), case.call(chosen, leaves)), case.label
    ROWWISE.rowwise("auto", x)
    ROWWISE.rowwise("auto", x)
    err = capsys.readouterr().err
    assert err.count(f"{ROWWISE.name} on cpu float32: no measurement") == 1          # said once, not per call


def test_shipped_table_is_generated_from_the_committed_results():
    """auto_table.json is make_auto_table.py's output over benchmarks/results (not edited by hand)."""
    def no_nan(name):
        raise AssertionError(f"auto_table.json holds {name}: an untimed figure was ranked")
    shipped = json.loads((ROOT / "gptfast" / "ops" / "auto_table.json").read_text(), parse_constant=no_nan)
    sources = [str(ROOT / s) for s in shipped["sources"]]
    bench = [s for s in sources if "bench_ops" in s]
    again = make_auto_table.build(bench, [s for s in sources if "compare" in s])
    assert bench and again["rows"] == shipped["rows"] and again["method"] == shipped["method"]
    ops_cpu = {(r["op"], r["dtype"]) for r in shipped["rows"] if r["device"] == "cpu"}
    trained = {(key, "float32") for op in OPS.values() if not op.inference_only and op.bench for key in op.table_keys}
    assert trained <= ops_cpu


def test_table_maker_vetoes_incorrect_backends_and_needs_a_real_win(tmp_path):
    def bench(path, times):
        results = [{"op": ELEMENTWISE.name, "mode": "fwd+bwd", "shape": [8, 8], "backend": b, "median_ms": ms}
                   for b, ms in times.items()]
        path.write_text(json.dumps({"environment": {"device": "CPU X", "device_type": "cpu", "dtype": "torch.float32",
                                                    "date": "2026-12-01T00:00:00"}, "results": results}))
        return str(path)
    fast = bench(tmp_path / "a.json", {"torch": 10.0, "extension": 5.0, "triton": 1.0, "reference": 50.0})
    table = make_auto_table.build([fast], [])
    assert [e["backend"] for e in table["rows"][0]["ranking"]] == ["extension", "torch", "reference"]
    tie = bench(tmp_path / "b.json", {"torch": 10.0, "extension": 9.9})               # 1.01x: noise, not a win
    assert make_auto_table.build([tie], [])["rows"][0]["ranking"][0]["backend"] == "torch"
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps({"device_type": "cpu", "rows": [
        {"part": "op", "name": ELEMENTWISE.name, "backend": "extension", "dtype": "float32", "status": "FAIL"}]}))
    vetoed = make_auto_table.build([fast], [str(compare)])
    assert "extension" not in [e["backend"] for e in vetoed["rows"][0]["ranking"]]


def test_the_fused_lm_head_loss_is_kept_unless_measurably_slower(tmp_path):
    """The fused LM head + loss's point is memory (no (N, V) logits): a fused backend ranks above the unfused
    torch path at a tie, and loses its place only below FUSED_MIN of torch's speed."""
    def bench(path, times):
        results = [{"op": MEMORY_FIRST.name, "mode": "fwd+bwd", "shape": [8, 8, 8], "backend": b, "median_ms": ms}
                   for b, ms in times.items()]
        path.write_text(json.dumps({"environment": {"device": "CPU X", "device_type": "cpu", "dtype": "torch.bfloat16",
                                                    "date": "2026-12-01T00:00:00"}, "results": results}))
        return str(path)
    tie = bench(tmp_path / "tie.json", {"torch": 10.0, "extension": 10.4})            # 0.96x: noise
    assert make_auto_table.build([tie], [])["rows"][0]["ranking"][0]["backend"] == "extension"
    slow = bench(tmp_path / "slow.json", {"torch": 10.0, "extension": 12.0})          # 0.83x: measurably slower
    assert make_auto_table.build([slow], [])["rows"][0]["ranking"][0]["backend"] == "torch"


def test_training_prints_and_records_the_choices(tmp_path, verdict_text):
    from gptfast.training import TrainSettings, run_training

    data = tmp_path / "v.txt"
    data.write_text(verdict_text)
    lines = []
    run_training(TrainSettings(data=str(data), preset="tiny", dtype="float32", epochs=1, batch_size=4, context_length=32,
                               max_steps=1, eval_freq=5, eval_iter=1, out=str(tmp_path / "run"), progress=False),
                 echo=lines.append)
    assert any("backend: auto" in line for line in lines)
    picked = {op: c.backend for op, c in auto.choices("cpu", "float32").items()}
    for op, name in picked.items():
        assert any(line.strip().startswith(f"auto: {op} -> {name}: ") for line in lines), (op, lines)
    config = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert config["backends"] == picked


def test_help_and_available_backends_show_the_choices():
    assert ops.available_backends()["auto"].startswith("available")
    result = subprocess.run([sys.executable, "scripts/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    flat = " ".join(result.stdout.split())
    assert result.returncode == 0 and "auto, which picks per op" in flat and DROP_KEY in flat

"""`scripts/compare.py`: the command runs on every backend here, and it catches broken kernels."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT
from gptfast import ops
from gptfast.compare import rules
from gptfast.compare.op_check import compare_case
from gptfast.model import GPTConfig, GPTModel
from gptfast.ops import OPS, reference, registry, torch_builtins
from gptfast.commands.compare import main as compare_main


def run_script(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "scripts/compare.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# examples picked by what the ops declare (this file names none)
ELEMENTWISE = next(op for op in OPS.values() if op.elementwise)
DROPPING = next(op for op in OPS.values() if op.drops_out and len(op.table_keys) > 1)


def backend_module(name, base, **overrides):
    """A backend module made of `base`'s functions with some replaced."""
    m = types.ModuleType(name)
    m.SHARES_DROPOUT_RNG = getattr(base, "SHARES_DROPOUT_RNG", True)
    for op in OPS:
        if hasattr(base, op):
            setattr(m, op, overrides.get(op, getattr(base, op)))
    sys.modules[name] = m
    return name


@pytest.fixture
def broken_backend():
    """A deliberately wrong backend: an elementwise op off by one part in a thousand, the rest the textbook ops."""
    off = getattr(reference, ELEMENTWISE.name)
    ops.register_backend("op-off", backend_module("_op_off", reference, **{ELEMENTWISE.name: lambda *a: off(*a) * (1 + 1e-3)}),
                         "broken")
    yield
    registry._BACKENDS.pop("op-off")
    registry._loaded.pop("op-off", None)
    sys.modules.pop("_op_off")


@pytest.mark.slow
def test_quick_run_passes_on_every_backend_here(tmp_path):
    """What CI runs: --quick over every backend available here, JSON with device, versions, commit."""
    out = tmp_path / "compare.json"
    result = run_script("--quick", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device_type"] == "cpu" and report["torch"] == torch.__version__ and "git_commit" in report
    here = [n for n, s in ops.available_backends().items() if s.startswith("available") and n != "reference"]
    assert sorted({r["backend"] for r in report["rows"]}) == sorted(here)
    assert {"extension", "torch"} <= set(here)
    parts = {(r["part"], r["name"]) for r in report["rows"]}
    assert parts >= {("op", name) for name in OPS} | {("model", "model"), ("run", "training run")}
    assert report["summary"]["FAIL"] == 0 and report["summary"]["PASS"] > 100
    for r in report["rows"]:                        # every skip says why
        assert r["status"] in ("PASS", "SKIP") and (r["status"] == "PASS" or r["note"])
    for op in (op for op in OPS.values() if not op.inference_only):     # every input gradient of every case
        leaves = {n for case in op.cases(True) for n in case.build(torch.Generator().manual_seed(0))}
        grads = {r["quantity"] for r in report["rows"] if r["name"] == op.name and r["backend"] == "extension"}
        assert grads >= {"out"} | {f"grad {n}" for n in leaves}, op.name
    n_params = len(list(GPTModel(GPTConfig.from_preset("tiny")).parameters()))
    model_rows = [r for r in report["rows"] if r["part"] == "model" and r["backend"] == "extension"]
    assert len(model_rows) == 2 + n_params                         # logits, loss, every parameter's gradient
    curves = report["loss_curves"]
    assert len(curves["reference (float64)"]) == 4 and "extension (float64)" in curves
    assert "triton (float32)" in curves                      # no float64 Triton kernels: run at float32
    assert "training-run losses, step by step" in result.stdout


def test_a_broken_op_fails_and_the_rest_pass(broken_backend, capsys):
    code = compare_main(["--quick", "--backend", "torch,op-off", "--ops-only"])
    out = capsys.readouterr().out
    assert code == 1
    table = [line for line in out.splitlines() if line.startswith("op ")]
    failed = [line for line in table if " FAIL" in line]
    assert failed and all("op-off" in line and f" {ELEMENTWISE.name} " in line for line in failed), failed
    assert all(" FAIL" in line for line in table[:len(failed)])   # on failure, the worst rows come first
    assert not any(line.split()[3] == "torch" and "FAIL" in line for line in table)


def test_broken_backend_fails_the_model_part(broken_backend, capsys):
    code = compare_main(["--quick", "--backend", "op-off", "--model-only"])
    out = capsys.readouterr().out
    assert code == 1
    assert any(line.startswith("model ") and "op-off" in line and "FAIL" in line for line in out.splitlines())
    assert any(line.startswith("run ") and "leaves the reference at step 0" in line for line in out.splitlines())


def test_half_precision_rule_uses_pytorchs_own_error():
    """bf16: the bar is min(1e-2, 2x PyTorch's error at bf16); a kernel 3x worse than PyTorch fails."""
    assert rules.op_tolerance(torch.bfloat16, baseline=1e-3) == pytest.approx(2e-3 + rules.BASELINE_SLACK)
    assert rules.op_tolerance(torch.bfloat16, baseline=0.1) == 1e-2
    assert rules.op_tolerance(torch.float32) == 1e-5 and rules.op_tolerance(torch.float32, tf32=True) == 3e-4
    assert not rules.passes(math.inf, 1.0) and not rules.passes(float("nan"), 1.0)
    assert rules.errors(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))[1] == math.inf

    ops.register_backend("coarse", "_coarse", "broken")
    twin = getattr(torch_builtins, ELEMENTWISE.name)
    sys.modules["_coarse"] = types.SimpleNamespace(**{ELEMENTWISE.name: lambda x: (twin(x.float()) * (1 + 8e-3)).to(x.dtype)})
    try:
        case = max(ELEMENTWISE.cases(True), key=lambda c: sum(t.numel() for t in c.build(torch.Generator()).values()))
        rows = compare_case(ELEMENTWISE, case, ["torch", "coarse"], torch.bfloat16, torch.device("cpu"), seed=0)
    finally:
        registry._BACKENDS.pop("coarse")
        registry._loaded.pop("coarse", None)
        sys.modules.pop("_coarse")
    by = {(r.backend, r.quantity): r for r in rows}
    assert by[("torch", "out")].status == "PASS"
    assert by[("coarse", "out")].rel < 1e-2 and by[("coarse", "out")].status == "FAIL"   # under 1e-2, still fails


def test_dropout_cases_compare_the_shared_mask_bit_for_bit():
    """With dropout the extension must drop exactly the reference's weights: a different seed (hence
    mask) on one side is an O(1) error, far above the tolerance."""
    op = DROPPING
    case = next(c for c in op.cases(True) if c.random)
    rows = compare_case(op, case, ["extension", "torch"], torch.float32, torch.device("cpu"), seed=0)
    assert all(r.status == "PASS" for r in rows if r.backend == "extension")
    assert [r.status for r in rows if r.backend == "torch"] == ["SKIP"]
    real = ops.get_backend("extension")
    ops.register_backend("other-seed", backend_module("_other_seed", real, **{op.name: lambda *a: getattr(real, op.name)(
        *a[:-1], torch.tensor([99]))}), "broken")       # the same kernels, the seed (the last argument) replaced
    try:
        rows = compare_case(op, case, ["other-seed"], torch.float32, torch.device("cpu"), seed=0)
    finally:
        registry._BACKENDS.pop("other-seed")
        registry._loaded.pop("other-seed", None)
        sys.modules.pop("_other_seed")
    assert all(r.status == "FAIL" and r.rel > 0.05 for r in rows)


@pytest.mark.parametrize("flags,message", [
    (["--backend", "warp-drive"], "unknown backend 'warp-drive'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice"),
    (["--preset", "giant"], "argument --preset: invalid choice"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--ops-only", "--model-only"], "not allowed with argument"),
] + ([(["--device", "cuda"], "no CUDA device is available")] if not torch.cuda.is_available() else []))
def test_bad_flags_are_one_line_and_exit_2(flags, message, capsys):
    try:
        code = compare_main(flags)
    except SystemExit as exit_:                       # argparse's errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bad_flag_from_a_shell():
    result = run_script("--backend", "warp-drive", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "compare.py: error: unknown backend 'warp-drive'; known: " + \
        ", ".join(ops.known_backends())


def test_module_invocation_and_help():
    result = subprocess.run([sys.executable, "-m", "scripts.compare", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--ops-only" in result.stdout and "--json" in result.stdout



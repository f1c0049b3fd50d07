"""`scripts/compare.py`: the command runs on every backend here, and it catches broken kernels."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from gptfast import ops
from gptfast.compare import rules
from gptfast.compare.op_check import compare_case
from gptfast.model import GPTConfig, GPTModel
from gptfast.ops import OPS, reference, registry, torch_builtins
from scripts.compare import main as compare_main


def case_labelled(op: str, label: str):
    return next(c for c in OPS[op].cases(False) if c.label == label)


def run_script(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "scripts/compare.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def broken_backends():
    """Two deliberately wrong backends: GELU off by one part in a thousand (the rest the textbook ops),
    and attention without its causal mask (the rest PyTorch's own ops, SDPA's dropout included)."""
    def module(name, base, **overrides):
        m = types.ModuleType(name)
        m.SHARES_DROPOUT_RNG = getattr(base, "SHARES_DROPOUT_RNG", True)
        for op in OPS:
            if hasattr(base, op):
                setattr(m, op, overrides.get(op, getattr(base, op)))
        sys.modules[name] = m
        return name

    def unmasked(q, k, v, dropout_p=0.0, scale=None, seed=None):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=False, scale=scale)

    ops.register_backend("gelu-off", module("_gelu_off", reference, gelu=lambda x: reference.gelu(x) * (1 + 1e-3)),
                         "broken")
    ops.register_backend("no-mask", module("_no_mask", torch_builtins, causal_attention=unmasked), "broken")
    yield
    for name in ("gelu-off", "no-mask"):
        registry._BACKENDS.pop(name)
        registry._loaded.pop(name, None)
    sys.modules.pop("_gelu_off")
    sys.modules.pop("_no_mask")


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
    assert parts >= {("op", "layer_norm"), ("op", "gelu"), ("op", "causal_attention"), ("op", "cross_entropy"),
                     ("model", "model"), ("run", "training run")}
    assert report["summary"]["FAIL"] == 0 and report["summary"]["PASS"] > 100
    for r in report["rows"]:                        # every skip says why
        assert r["status"] in ("PASS", "SKIP") and (r["status"] == "PASS" or r["note"])
    grads = {r["quantity"] for r in report["rows"] if r["name"] == "causal_attention" and r["backend"] == "extension"}
    assert grads >= {"out", "grad q", "grad k", "grad v", "grad qkv"}   # every input gradient, fused QKV too
    n_params = len(list(GPTModel(GPTConfig.from_preset("tiny")).parameters()))
    model_rows = [r for r in report["rows"] if r["part"] == "model" and r["backend"] == "extension"]
    assert len(model_rows) == 2 + n_params                         # logits, loss, every parameter's gradient
    curves = report["loss_curves"]
    assert len(curves["reference (float64)"]) == 4 and "extension (float64)" in curves
    assert "triton (float32)" in curves                      # no float64 Triton kernels: run at float32
    assert "training-run losses, step by step" in result.stdout


def test_broken_gelu_and_missing_causal_mask_fail(broken_backends, capsys):
    code = compare_main(["--quick", "--backend", "torch,gelu-off,no-mask", "--ops-only"])
    out = capsys.readouterr().out
    assert code == 1
    table = [line for line in out.splitlines() if line.startswith("op ")]
    failed = [line for line in table if " FAIL" in line]
    assert failed and all(("gelu-off" in line and " gelu " in line) or ("no-mask" in line and "causal_attention" in line)
                          for line in failed), failed
    assert any("gelu-off" in line for line in failed) and any("no-mask" in line for line in failed)
    assert all(" FAIL" in line for line in table[:len(failed)])   # on failure, the worst rows come first
    # T=1 has nothing to mask: the unmasked attention is right there, and the table says so
    assert any("no-mask" in line and "T1 D64 " in line and "PASS" in line for line in table)
    assert not any(line.split()[3] == "torch" and "FAIL" in line for line in table)


def test_broken_backend_fails_the_model_part(broken_backends, capsys):
    code = compare_main(["--quick", "--backend", "gelu-off", "--model-only"])
    out = capsys.readouterr().out
    assert code == 1
    assert any(line.startswith("model ") and "gelu-off" in line and "FAIL" in line for line in out.splitlines())
    assert any(line.startswith("run ") and "leaves the reference at step 0" in line for line in out.splitlines())


def test_half_precision_rule_uses_pytorchs_own_error():
    """bf16: the bar is min(1e-2, 2x PyTorch's error at bf16); a kernel 3x worse than PyTorch fails."""
    assert rules.op_tolerance(torch.bfloat16, baseline=1e-3) == pytest.approx(2e-3 + rules.BASELINE_SLACK)
    assert rules.op_tolerance(torch.bfloat16, baseline=0.1) == 1e-2
    assert rules.op_tolerance(torch.float32) == 1e-5 and rules.op_tolerance(torch.float32, tf32=True) == 3e-4
    assert not rules.passes(math.inf, 1.0) and not rules.passes(float("nan"), 1.0)
    assert rules.errors(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))[1] == math.inf

    ops.register_backend("coarse", "_coarse", "broken")
    sys.modules["_coarse"] = types.SimpleNamespace(gelu=lambda x: (torch_builtins.gelu(x.float()) * (1 + 8e-3)).to(x.dtype))
    try:
        rows = compare_case(OPS["gelu"], case_labelled("gelu", "64x3072"), ["torch", "coarse"], torch.bfloat16,
                            torch.device("cpu"), seed=0)
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
    op, case = OPS["causal_attention"], case_labelled("causal_attention", "B2 H3 T48 D64 dropout 0.1")
    rows = compare_case(op, case, ["extension", "torch"], torch.float32, torch.device("cpu"), seed=0)
    assert all(r.status == "PASS" for r in rows if r.backend == "extension")
    assert [r.status for r in rows if r.backend == "torch"] == ["SKIP"]
    shifted = dataclasses.replace(case, call=lambda backend, t: case.call(backend, t) if backend == "reference" else
                                  ops.causal_attention(t["q"], t["k"], t["v"], dropout_p=0.1,
                                                       seed=torch.tensor([99]), backend=backend))
    rows = compare_case(op, shifted, ["extension"], torch.float32, torch.device("cpu"), seed=0)
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


def test_the_model_check_and_training_run_take_the_path_train_py_takes(monkeypatch):
    """The loss through model(x, y) -> ops.linear_cross_entropy (not logits then cross_entropy), and the
    optimizer from make_optimizer (decay groups, fused AdamW)."""
    from gptfast.compare import model_check

    calls = {"lce": 0, "ce": 0, "opt": 0}

    def counting(name, real):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ops, "linear_cross_entropy", counting("lce", ops.linear_cross_entropy))
    monkeypatch.setattr(ops, "cross_entropy", counting("ce", ops.cross_entropy))
    monkeypatch.setattr(model_check, "make_optimizer", counting("opt", model_check.make_optimizer))
    base = model_check.seeded_model("tiny", 0, drop_rate=0.0)
    batches = model_check.verdict_batches(2, 2, 16, 0)
    model_check.forward_backward(base, "torch", torch.float32, torch.device("cpu"), *batches[0])
    assert calls == {"lce": 1, "ce": 0, "opt": 0}
    losses = model_check.training_losses(base, "torch", torch.float32, torch.device("cpu"), batches, seed=1)
    assert calls == {"lce": 3, "ce": 0, "opt": 1} and len(losses) == 2 and all(0 < x < 20 for x in losses)

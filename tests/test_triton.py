"""The `triton` backend as a whole: a model trains and compiles on it, and gptfast works without Triton installed.
Each op's Triton kernels are tested in its own file (tests/test_<op>.py) and by tests/test_op_contract.py; without
a CUDA GPU they run in Triton's interpreter on CPU tensors."""
import pytest
import torch

triton_ops = pytest.importorskip("gptfast.ops.triton", reason="Triton is not installed",
                                 exc_type=ImportError)

from conftest import rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- the model
@pytest.mark.slow
def test_short_training_run_matches_reference(verdict_text, gpt2_tokenizer):
    from conftest import training_losses

    ids = torch.tensor(gpt2_tokenizer.encode(verdict_text)[:2000]) % 101
    ref = training_losses("reference", ids, steps=8, batch=2, T=30, context_length=32)
    tri = training_losses("triton", ids, steps=8, batch=2, T=30, context_length=32)
    assert (ref - tri).abs().max() < 1e-4, (ref, tri)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=101, context_length=64, emb_dim=64, n_heads=4, n_layers=1,
                               drop_rate=0.0, backend="triton")).to(DEVICE).eval()
    idx = torch.randint(0, 101, (2, 40), device=DEVICE)
    eager = model(idx)
    out = torch.compile(model, fullgraph=True)(idx)
    assert rel_error(out, eager) < (3e-4 if DEVICE == "cuda" else 1e-5)   # tf32 dots on GPU


def test_gptfast_imports_and_reports_when_triton_is_missing():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; sys.modules['triton'] = None\n"          # as if Triton were not installed
            "import gptfast, gptfast.model, gptfast.ops as o\n"
            "print(o.available_backends()['triton'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unavailable:") and "triton" in result.stdout



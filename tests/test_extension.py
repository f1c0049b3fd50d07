"""The `extension` backend (our C++ kernels) against the float64 reference twins."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, rel_error
from gptfast import ops
from gptfast.compiled import load_extension, set_poison_outputs

_C = load_extension()   # the suite builds it; a failure here says why
KERNELS = torch.ops.gptfast


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Kernel outputs start as NaN, so any element a kernel fails to write fails the test."""
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)




# ----------------------------------------------------------------------------- the model
def small_model(backend, drop_rate=0.0, seed=0):
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=101, context_length=48, emb_dim=64, n_heads=4, n_layers=2,
                              drop_rate=drop_rate, backend=backend))


def test_twenty_training_steps_match_reference_with_dropout(verdict_text, gpt2_tokenizer):
    from conftest import training_losses

    ids = torch.tensor(gpt2_tokenizer.encode(verdict_text)[:4000]) % 101
    ref = training_losses("reference", ids, steps=20, batch=4, T=40, context_length=48)
    ext = training_losses("extension", ids, steps=20, batch=4, T=40, context_length=48)
    assert (ref - ext).abs().max() < 1e-4, (ref, ext)
    assert ref[-5:].mean() < ref[:5].mean()          # it is actually training


@pytest.mark.slow
def test_torch_compile_fullgraph_extension():
    model = small_model("extension").eval()
    idx = torch.randint(0, 101, (2, 30))
    eager = model(idx)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(idx)
    assert rel_error(out, eager) < 1e-5
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), idx.flatten())
    loss.backward()
    assert model.trf_blocks[0].att.W_query.weight.grad is not None
    train_model = small_model("extension", drop_rate=0.1).train()      # dropout seeds inside the graph
    train_out = torch.compile(train_model, fullgraph=True)(idx)
    assert torch.isfinite(train_out).all()


def test_build_info_and_available_backends():
    info = _C.build_info()
    assert "cpu" in info["compiled_backends"] and info["cpu_isa"]
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert ops.available_backends()["extension"].startswith("available")


def test_stale_or_missing_extension_is_reported_not_fatal():
    code = ("import gptfast._build_meta as m; m.source_hash = lambda root=None: 'f' * 16\n"
            "import gptfast, gptfast.ops as o; print(o.available_backends()['extension'])")
    env = {**os.environ, "GPTFAST_JIT": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unavailable" in result.stdout and "stale" in result.stdout and "pip install -e ." in result.stdout


def test_native_bpe_trainer_gives_identical_merges(large_text):
    import regex
    from collections import Counter

    from gptfast.tokenizer import GPT2_SPLIT_PATTERN, learn_merges

    counts = Counter(tuple(c.encode()) for c in regex.findall(GPT2_SPLIT_PATTERN, large_text[:300_000]))
    assert learn_merges(counts, 500, native=True) == learn_merges(counts, 500, native=False)



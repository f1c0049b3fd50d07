"""GPT-2 weights in Hugging Face format load into GPTModel and match `transformers` exactly."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the GPT-2 parity tests need the `transformers` test extra",
                                   exc_type=ImportError)

from conftest import ROOT, rel_error  # noqa: E402
from gptfast.generate import generate  # noqa: E402
from gptfast.model import load_gpt2  # noqa: E402

BACKENDS = ["reference", "torch", "extension", "triton"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)                                  # model.safetensors + config.json
    bin_folder = tmp_path_factory.mktemp("gpt2bin")
    model.save_pretrained(bin_folder, safe_serialization=False)    # pytorch_model.bin
    return model, folder, bin_folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(hf_folder, backend):
    hf, folder, _ = hf_folder
    ours = load_gpt2(str(folder), backend=backend).eval()
    assert ours.cfg.qkv_bias and ours.cfg.tie_embeddings
    assert ours.out_head.weight.data_ptr() == ours.tok_emb.weight.data_ptr()
    idx = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(ours(idx), hf(idx).logits) < 1e-5


@pytest.mark.parametrize("backend", ["reference", "torch", "extension"])
def test_greedy_generation_matches_transformers(hf_folder, backend):
    hf, folder, _ = hf_folder
    ours = load_gpt2(str(folder), backend=backend)
    prompt = torch.tensor([[5, 17, 42]])
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for use_cache in (True, False):
        assert torch.equal(generate(ours, prompt, 20, use_cache=use_cache), theirs)


def test_pytorch_model_bin_loads_the_same(hf_folder):
    _, folder, bin_folder = hf_folder
    a, b = load_gpt2(str(folder)), load_gpt2(str(bin_folder))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        (tmp_path / "config.json").write_text('{"vocab_size": 5, "n_positions": 4, "n_embd": 8, "n_head": 2, "n_layer": 1}')
        load_gpt2(str(tmp_path))


@pytest.fixture(scope="module")
def hf_full_vocab_folder(tmp_path_factory):
    """A tiny model with GPT-2's real vocabulary, so the GPT-2 tokenizer fits it."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    folder = tmp_path_factory.mktemp("gpt2full")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_generate_script_and_fine_tuning_from_gpt2(hf_folder, hf_full_vocab_folder, tmp_path, verdict_text):
    _, small_vocab, _ = hf_folder
    folder = hf_full_vocab_folder
    env_py = [sys.executable]
    gen = subprocess.run(env_py + ["scripts/generate.py", "--gpt2-dir", str(folder), "--prompt", "Hi",
                                   "--prompt", "Every", "--max-new-tokens", "3", "--temperature", "0.7", "--top-p",
                                   "0.9", "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    lines = gen.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Hi") and lines[1].startswith("Every")
    bad = subprocess.run(env_py + ["scripts/generate.py", "--gpt2-dir", str(small_vocab)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "97 tokens" in bad.stderr and "Traceback" not in bad.stderr
    data = tmp_path / "v.txt"
    data.write_text(verdict_text)
    train = subprocess.run(env_py + ["scripts/train.py", "--data", str(data), "--init-from", str(small_vocab),
                                     "--epochs", "1", "--context-length", "16", "--out", str(tmp_path / "run"),
                                     "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 2 and "--init-from model has 97 tokens" in train.stderr
    ok = subprocess.run(env_py + ["scripts/train.py", "--data", str(data), "--init-from", str(folder), "--epochs", "1",
                                  "--context-length", "32", "--batch-size", "8", "--eval-freq", "50",
                                  "--out", str(tmp_path / "run"), "--no-progress"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "initialized from GPT-2 weights" in ok.stdout and "Train loss" in ok.stdout

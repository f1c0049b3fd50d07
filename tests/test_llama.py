"""The Llama 3 / Qwen3 family (gptfast/model/llama.py) against transformers itself: tiny random models built in
the test (no download) - logits, loss and every gradient, greedy generation with the KV cache, bfloat16,
sharded checkpoints, export back to a folder transformers loads, and a tokenizer.json round trip."""
import json

import pytest
import torch

from conftest import rel_error
from gptfast.generate import generate, generate_simple
from gptfast.model import LlamaConfig, LlamaModel, build_model, config_from_preset, export_llama, load_llama
from gptfast.model.llama_weights import gptfast_to_hf, hf_llama_config

transformers = pytest.importorskip("transformers", reason="the Llama/Qwen3 tests compare with the `transformers` "
                                   "test extra")

BACKENDS = ["reference", "torch", "extension"]


def hf_model(kind: str, tied: bool = True, seed: int = 0):
    """A tiny random Qwen3ForCausalLM (q/k norm, head_dim apart from hidden/heads) or LlamaForCausalLM (Llama 3's
    rope scaling, one K/V head), float32, eval mode."""
    torch.manual_seed(seed)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       max_position_embeddings=64, tie_word_embeddings=tied, rope_theta=1e6)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=16384,
                                       tie_word_embeddings=tied, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():                        # non-trivial norms: the q/k and block norms' weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=[("qwen3", True), ("llama", False)], ids=["qwen3-tied", "llama-untied"])
def pair(request, tmp_path_factory):
    kind, tied = request.param
    folder = tmp_path_factory.mktemp(kind)
    hf = hf_model(kind, tied)
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_loss_and_every_gradient_match_transformers(pair, backend):
    hf, folder = pair
    ours = load_llama(str(folder), backend=backend).train()
    idx = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_error(ours(idx), hf(idx).logits) < 1e-5
    hf_loss = torch.nn.functional.cross_entropy(hf(idx).logits.flatten(0, 1), targets.flatten())
    loss = ours(idx, targets)
    assert abs(loss.item() - hf_loss.item()) < 1e-5 * abs(hf_loss.item())
    hf.zero_grad()
    hf_loss.backward()
    loss.backward()
    theirs = gptfast_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.cfg)
    for name, p in hf.named_parameters():
        assert rel_error(theirs[name], p.grad) < 1e-5, name


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_greedy_generation_with_the_cache_is_transformers_greedy(pair, backend):
    hf, folder = pair
    ours = load_llama(str(folder), backend=backend)
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(3))
    mine = generate(ours, prompt, max_new_tokens=12)                 # KV cache
    assert torch.equal(mine, generate_simple(ours, prompt, 12))      # the textbook loop, no cache
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                         attention_mask=torch.ones_like(prompt))
    assert torch.equal(mine, theirs)


def test_the_cache_holds_n_kv_heads():
    model = LlamaModel(config_from_preset("qwen3-tiny"))
    cache = model.new_kv_cache(3)
    assert cache.layers[0].k.shape == (3, model.cfg.n_kv_heads, model.cfg.context_length, model.cfg.head_dim)
    assert model.cfg.n_kv_heads < model.cfg.n_heads


def test_bfloat16_within_twice_transformers_error(pair):
    hf, folder = pair
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = hf(idx).logits.double()
        theirs = hf.to(torch.bfloat16)(idx).logits
        hf.float()
        ours = load_llama(str(folder), backend="extension", dtype=torch.bfloat16)(idx)
    assert ours.dtype == torch.bfloat16
    assert rel_error(ours, exact) <= max(2 * rel_error(theirs, exact), 1e-2)


def test_sharded_checkpoints_load(tmp_path):
    hf = hf_model("qwen3", seed=5)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    idx = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_error(load_llama(str(tmp_path), backend="reference")(idx), hf(idx).logits) < 1e-5


@pytest.mark.parametrize("preset", ["qwen3-tiny", "qwen3-small"])
def test_export_is_what_transformers_loads(preset, tmp_path):
    torch.manual_seed(7)
    ours = build_model(config_from_preset(preset, vocab_size=300, backend="extension")).eval()
    export_llama(ours, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads(json.dumps(hf_llama_config(ours.cfg)))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_error(ours(idx), theirs(idx).logits) < 1e-5
        assert rel_error(load_llama(str(tmp_path / "out"))(idx), ours(idx)) < 1e-6
    with pytest.raises(FileExistsError, match="already exists"):
        export_llama(ours, str(tmp_path / "out"))


def test_a_tokenizer_json_made_here_round_trips_text(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from gptfast.tokenizer import HFTokenizer, tokenizer_from_spec

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "Every effort moves you, Ünïcödé and emoji 🙂 too.\n  Indented   spaces\tand tabs.\n" * 20
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ours = HFTokenizer.from_folder(str(tmp_path))
    sample = "A new sentence: effort, ünïcödé 🙂\n\ttabs  and   spaces!"
    assert ours.decode(ours.encode(sample)) == sample
    assert ours.eot_id == tok.token_to_id("<|endoftext|>") and ours.n_vocab == tok.get_vocab_size()
    again = tokenizer_from_spec(ours.spec())
    assert again.encode(sample) == ours.encode(sample) and again.eot_id == ours.eot_id


def test_config_checks_name_the_knob():
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        LlamaConfig(n_heads=4, n_kv_heads=3, emb_dim=64)
    with pytest.raises(ValueError, match="head_dim must be even"):
        LlamaConfig(n_heads=4, n_kv_heads=2, emb_dim=64, head_dim=15)


def run_cli(*args, cwd):
    import os
    import subprocess
    import sys

    from conftest import ROOT
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_train_generate_quantize_export_from_the_command_line(tmp_path):
    """train.py --preset qwen3-tiny, then generate.py (float and int8), export.py, and transformers reading it."""
    from conftest import ROOT
    train = run_cli(str(ROOT / "scripts/train.py"), "--preset", "qwen3-tiny", "--max-steps", "3", "--eval-iter", "1",
                    "--sample-tokens", "3", "--no-progress", "--out", "run", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    for quant in ("none", "int8"):
        gen = run_cli(str(ROOT / "scripts/generate.py"), "--checkpoint", "run", "--prompt", "Every effort",
                      "--max-new-tokens", "4", "--quantize", quant, cwd=tmp_path)
        assert gen.returncode == 0 and gen.stdout.startswith("Every effort"), gen.stderr[-3000:]
    export = run_cli(str(ROOT / "scripts/export.py"), "--checkpoint", "run", "--out", "hf", cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    from gptfast.training import load_checkpoint
    ours, _ = load_checkpoint(str(tmp_path / "run"), backend="extension")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (1, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel_error(ours.eval()(idx), theirs(idx).logits) < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok.encode("Every effort moves you")) == "Every effort moves you"


def test_generate_reads_a_hugging_face_folder(pair, tmp_path):
    """generate.py --checkpoint on a Llama/Qwen3 folder with its tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from conftest import ROOT
    hf, folder = pair
    vocab = {chr(ord("a") + i): i for i in range(26)} | {" ": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()                                # characters back without separators
    tok.save(str(folder / "tokenizer.json"))
    gen = run_cli(str(ROOT / "scripts/generate.py"), "--checkpoint", str(folder), "--prompt", "abc",
                  "--max-new-tokens", "5", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    ids = torch.tensor([[0, 1, 2]])
    want = hf.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, attention_mask=torch.ones_like(ids))
    inverse = {i: c for c, i in vocab.items()}
    assert gen.stdout.strip() == "".join(inverse.get(int(i), "") for i in want[0]).strip()


def test_quantized_llama_models_decode_and_refuse_training():
    from gptfast.model import quantize
    torch.manual_seed(10)
    model = build_model(config_from_preset("qwen3-tiny", vocab_size=300, backend="extension")).eval()
    idx = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model(idx)
    for mode, tol in (("bf16", 1e-2), ("int8", 3e-2)):
        import copy
        q = quantize(copy.deepcopy(model), mode)
        assert type(q).__name__ == "QuantizedLlamaModel" and q.quantization == mode
        with torch.no_grad():
            assert rel_error(q(idx), ref) < tol
        assert torch.equal(generate(q, idx, 6), generate_simple(q, idx, 6))
        with pytest.raises(RuntimeError, match="inference only"):
            q.train()(idx)

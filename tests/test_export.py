"""Models handed on: export to a Hugging Face GPT-2 folder (transformers loads and computes the same),
the weights-only model.safetensors of a run, and the export script's errors."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the export tests need the `transformers` test extra",
                                   exc_type=ImportError)

from conftest import rel_error  # noqa: E402
from gptfast.generate import generate  # noqa: E402
from gptfast.model import GPTConfig, GPTModel, export_hf, load_gpt2  # noqa: E402
from gptfast.tokenizer import ByteLevelBPE, get_tokenizer  # noqa: E402
from gptfast.training import load_checkpoint, save_checkpoint  # noqa: E402
from gptfast.training.checkpoint import read_checkpoint, save_weights  # noqa: E402
from gptfast.commands.export import main as export_main  # noqa: E402

# the book's layout (untied head, no Q/K/V biases) and GPT-2's (tied, biases) with a padded vocabulary;
# small widths, GPT-2's real vocabulary, and a context length other than 1024
BOOK = dict(vocab_size=50257, context_length=48, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
GPT2_TIED = dict(BOOK, qkv_bias=True, tie_embeddings=True, vocab_multiple=64)


def trained_looking(cfg: GPTConfig, seed: int) -> GPTModel:
    """A model whose every parameter is random (LayerNorm and biases too, not their 1/0 init), so
    that a parameter exported to the wrong place cannot go unnoticed."""
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_pair(tmp_path, layout: dict, seed: int):
    cfg = GPTConfig(**layout, backend="reference")
    ours = trained_looking(cfg, seed)
    folder = tmp_path / "hf"
    export_hf(ours, str(folder), tokenizer=get_tokenizer("gpt2"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return ours, theirs, folder


@pytest.mark.parametrize("layout", [BOOK, GPT2_TIED], ids=["book-untied", "gpt2-tied-padded"])
def test_transformers_computes_what_we_compute(tmp_path, verdict_text, layout):
    ours, theirs, folder = hf_pair(tmp_path, layout, seed=3)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == layout.get("tie_embeddings", False) and cfg["n_positions"] == 48
    assert theirs.lm_head.weight.shape == (50257, 32)                      # padded rows cut back
    ids = get_tokenizer("gpt2").encode(verdict_text)
    x = torch.tensor([ids[:48], ids[1000:1048]])                           # real text, a batch of 2
    with torch.no_grad():
        err = rel_error(theirs(x).logits, ours(x)[..., :50257])
    assert err < 1e-5, err
    prompt = torch.tensor([ids[:5]])
    hf_tokens = theirs.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=50256)
    assert torch.equal(generate(ours, prompt, 15), hf_tokens)


@pytest.mark.parametrize("layout", [BOOK, GPT2_TIED], ids=["book-untied", "gpt2-tied-padded"])
def test_round_trip_through_init_from_gives_back_the_same_model(tmp_path, layout):
    ours, _, folder = hf_pair(tmp_path, layout, seed=4)
    back = load_gpt2(str(folder), backend="reference")
    assert back.cfg.to_dict() == ours.cfg.to_dict()
    V = ours.cfg.vocab_size
    for (name, a), (name_b, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert name == name_b
        if name in ("tok_emb.weight", "out_head.weight"):          # padded rows are not part of the model
            a, b = a[:V], b[:V]
        assert torch.equal(a, b), name
    assert back.cfg.tie_embeddings == (back.out_head.weight.data_ptr() == back.tok_emb.weight.data_ptr())


def test_exported_tokenizers_encode_the_verdict_as_ours(tmp_path, verdict_text):
    for name, tok in (("gpt2", get_tokenizer("gpt2")), ("bpe", ByteLevelBPE.train(verdict_text[:8000], 400))):
        folder = tmp_path / name
        model = GPTModel(GPTConfig(vocab_size=tok.n_vocab, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
        export_hf(model, str(folder), tokenizer=tok)
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        text = verdict_text + " <|endoftext|> naïve café 123  tabs\tand\n\nnewlines"
        assert theirs(text)["input_ids"] == tok.encode(text), name
        assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == tok.eot_id
        assert theirs.decode(tok.encode(verdict_text)) == verdict_text


def test_a_bpe_with_another_pattern_is_refused(tmp_path, verdict_text):
    tok = ByteLevelBPE.train(verdict_text[:2000], 300, pattern=r"\S+|\s+")
    with pytest.raises(ValueError, match="its own pattern, not GPT-2's"):
        export_hf(GPTModel(GPTConfig(vocab_size=300, context_length=8, emb_dim=8, n_heads=2, n_layers=1)),
                  str(tmp_path / "x"), tokenizer=tok)


def test_weights_file_holds_the_model_without_pickle(tmp_path):
    tok = get_tokenizer("gpt2")
    for layout in (BOOK, GPT2_TIED):
        model = trained_looking(GPTConfig(**layout), seed=5)
        path = str(tmp_path / "model.safetensors")
        save_weights(path, model, tok)
        with open(path, "rb") as f:                          # safetensors: a JSON header, then raw tensors
            assert b"gptfast-weights" in f.read(100_000)
        again, state = load_checkpoint(path)
        assert state["tokenizer"] == {"name": "gpt2"} and "optimizer" not in state
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        if layout.get("tie_embeddings"):                     # stored once, tied again on reading
            assert again.out_head.weight.data_ptr() == again.tok_emb.weight.data_ptr()
            assert os.path.getsize(path) < 1.2 * 4 * sum(p.numel() for p in model.parameters())


def test_export_script_from_a_checkpoint_and_its_errors(tmp_path, capsys):
    model = trained_looking(GPTConfig(**BOOK), seed=6)
    save_checkpoint(str(tmp_path / "checkpoint.pt"), model, tokenizer=get_tokenizer("gpt2"))
    out = tmp_path / "exported"
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
                                       "vocab.json"]
    # an existing non-empty --out: refused, then --force
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    for bad, says in ((tmp_path / "missing.pt", "checkpoint not found"), (truncated, "not a readable"),
                      (foreign, "not a gptfast checkpoint"), (garbage, "not a readable safetensors")):
        assert export_main(["--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "o")                # nothing half-written for a bad checkpoint


def test_weights_only_file_is_read_like_a_checkpoint(tmp_path):
    """read_checkpoint gives the same model state from checkpoint.pt and model.safetensors."""
    model = trained_looking(GPTConfig(**BOOK), seed=7)
    save_checkpoint(str(tmp_path / "checkpoint.pt"), model, tokenizer=get_tokenizer("gpt2"))
    save_weights(str(tmp_path / "model.safetensors"), model, get_tokenizer("gpt2"))
    a, b = read_checkpoint(str(tmp_path / "checkpoint.pt")), read_checkpoint(str(tmp_path / "model.safetensors"))
    assert a["config"] == b["config"] and a["tokenizer"] == b["tokenizer"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_init_from_takes_an_exported_folder_and_a_weights_file(tmp_path):
    """--init-from: the exported Hugging Face folder and a run's model.safetensors give the same model."""
    from gptfast.training import TrainSettings
    from gptfast.training.run import pretrained_model

    model = trained_looking(GPTConfig(**GPT2_TIED, backend="reference"), seed=8)
    tok = get_tokenizer("gpt2")
    export_hf(model, str(tmp_path / "hf"), tokenizer=tok)
    save_weights(str(tmp_path / "model.safetensors"), model, tok)
    said = []
    for source in ("hf", "model.safetensors"):
        s = TrainSettings(init_from=str(tmp_path / source))
        again = pretrained_model(s, "reference", tok, said.append)
        assert again.cfg.tie_embeddings and again.cfg.vocab_multiple == 64
        x = torch.randint(0, 50257, (1, 20))
        with torch.no_grad():
            assert torch.equal(again.eval()(x)[..., :50257], model(x)[..., :50257]), source   # padded columns aside
    assert said == [f"initialized from GPT-2 weights in {tmp_path / 'hf'}",
                    f"initialized from gptfast checkpoint {tmp_path / 'model.safetensors'}"]

"""gptfast's kernels in transformers' Llama and Qwen3 models (gptfast/integrations/transformers/llama.py): the
patched model against the unpatched one - logits, loss and every gradient, greedy generation with the cache,
padded batches, save/load, torch.compile and the Trainer."""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the integration tests need the `transformers` test extra",
                                   exc_type=ImportError)

from conftest import rel_error  # noqa: E402
from gptfast import ops  # noqa: E402
from gptfast.integrations import transformers as gi  # noqa: E402


def random_model(kind: str, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    if kind == "qwen3":
        config = transformers.Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          max_position_embeddings=128, tie_word_embeddings=True,
                                          attention_dropout=dropout)
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                          attention_dropout=dropout)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(autouse=True)
def transformers_rope_back():
    yield
    gi.revert_gptfast_rope()


def pair(kind: str, backend: str = "extension", seed: int = 0):
    theirs = random_model(kind, seed)
    ours = copy.deepcopy(theirs)
    return theirs, ours, gi.apply_gptfast(ours, backend=backend)


def tokens(batch, length, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("backend", ["reference", "torch", "extension"])
def test_logits_loss_and_every_gradient_match_the_unpatched_model(kind, backend, monkeypatch):
    calls = []
    for op in ("rms_norm", "swiglu", "rope", "causal_attention", "linear_cross_entropy"):
        real = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    theirs, ours, patch = pair(kind, backend)
    n_layers = theirs.config.num_hidden_layers
    assert patch.attention_layers == n_layers and patch.swiglus == n_layers and patch.rope and patch.fused_loss
    assert patch.rms_norms == (4 if kind == "qwen3" else 2) * n_layers + 1
    x = tokens(2, 19)
    with torch.no_grad():
        assert rel_error(ours.eval()(x).logits, theirs.eval()(x).logits) < 1e-5
    ours.train(), theirs.train()
    out = ours(x, labels=x)
    ref = theirs(x, labels=x)
    assert out.logits is None and abs(out.loss.item() - ref.loss.item()) < 1e-5 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert rel_error(a.grad, b.grad) < 1e-5, name
    assert set(calls) == {"rms_norm", "swiglu", "rope", "causal_attention", "linear_cross_entropy"}


def test_greedy_generation_and_a_padded_batch():
    theirs, ours, _ = pair("qwen3", "extension", seed=2)
    prompt = tokens(2, 6, seed=3)
    want = theirs.eval().generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.eval().generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0), want)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0                                   # left padding: per-row positions, SDPA's mask: theirs
    with torch.no_grad(), pytest.warns(gi.GptfastFallbackWarning, match="attention mask"):
        a = ours(prompt, attention_mask=mask).logits
    with torch.no_grad():
        assert rel_error(a[:, 2:], theirs(prompt, attention_mask=mask).logits[:, 2:]) < 1e-5


def test_save_and_from_pretrained_round_trip(tmp_path):
    theirs, ours, _ = pair("llama", "extension", seed=4)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    cfg_ours, cfg_theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs"))
    assert cfg_ours == cfg_theirs and set(ours.state_dict()) == set(theirs.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    gi.apply_gptfast(back, backend="extension")
    x = tokens(2, 9)
    with torch.no_grad():
        assert rel_error(back.eval()(x).logits, theirs.eval()(x).logits) < 1e-5


def test_what_is_left_alone_is_said():
    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, hidden_act="gelu")
    patch = gi.apply_gptfast(transformers.LlamaModel(config), backend="torch")
    assert patch.swiglus == 0 and any("'gelu' is not SwiGLU's silu" in s for s in patch.left_alone)
    assert not patch.fused_loss and any("no LM head" in s for s in patch.left_alone)


@pytest.mark.slow
def test_torch_compile_of_the_patched_model():
    theirs, ours, _ = pair("qwen3", "extension", seed=6)
    compiled = torch.compile(ours, fullgraph=True)
    x = tokens(2, 16)
    ours.train(), theirs.train()
    loss = compiled(x, labels=x).loss
    loss.backward()
    ref = theirs(x, labels=x).loss
    ref.backward()
    assert rel_error(loss, ref) < 1e-5
    assert rel_error(ours.model.layers[0].mlp.gate_proj.weight.grad, theirs.model.layers[0].mlp.gate_proj.weight.grad) \
        < 1e-5


@pytest.mark.slow
def test_trainer_runs_the_patched_model_and_matches_the_unpatched_one(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs the `accelerate` test extra",
                        exc_type=ImportError)
    data = [{"input_ids": t, "labels": t.clone()} for t in tokens(8, 16, seed=7)]

    def run(model, name):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    theirs, ours, _ = pair("qwen3", "extension", seed=8)
    losses_ours, losses_theirs = run(ours, "ours"), run(theirs, "theirs")
    assert len(losses_ours) == 3 and losses_ours == pytest.approx(losses_theirs, rel=1e-4)

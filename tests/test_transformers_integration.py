"""gptfast's kernels inside Hugging Face GPT-2 (gptfast.integrations.transformers), tested against
transformers itself: the unpatched model, same weights, on CPU in float32 - tiny configs built here,
no downloads."""
import copy
import inspect
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the integration tests need the `transformers` test extra",
                                   exc_type=ImportError)

from conftest import ROOT, rel_error  # noqa: E402
from gptfast import ops  # noqa: E402
from gptfast.integrations import transformers as gi  # noqa: E402
from gptfast.integrations.transformers import attention as gi_attention  # noqa: E402

GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
BACKENDS = ["reference", "torch", "extension", "triton", "auto"]


def tiny_config(dropout: float = 0.0, **over) -> "transformers.GPT2Config":
    """GPT-2's shape in miniature: head dim 64 (GPT-2's), an odd vocabulary, two layers."""
    layout = dict(n_layer=2, n_head=2, n_embd=128, vocab_size=211, n_positions=64, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2Config(**{**layout, **over})


def random_model(config, seed: int = 0):
    """Every parameter random (LayerNorm and biases too), so that a kernel touching the wrong one shows."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def pair(backend: str = "extension", dropout: float = 0.0, seed: int = 0, **over):
    theirs = random_model(tiny_config(dropout, **over), seed)
    ours = copy.deepcopy(theirs)
    patch = gi.apply_gptfast(ours, backend=backend)
    return theirs, ours, patch


def tokens(batch: int, length: int, seed: int = 1, vocab: int = 211) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def attention_calls(monkeypatch):
    """Every ops.causal_attention call the integration makes: (Tq, Tk, dropout_p, backend)."""
    calls, real = [], ops.causal_attention

    def spy(q, k, v, dropout_p=0.0, scale=None, seed=None, backend=None):
        calls.append((q.shape[2], k.shape[2], dropout_p, backend))
        return real(q, k, v, dropout_p=dropout_p, scale=scale, seed=seed, backend=backend)

    monkeypatch.setattr(ops, "causal_attention", spy)
    gi_attention._warned.clear()
    return calls


def test_import_gptfast_does_not_import_transformers():
    code = ("import sys, gptfast, gptfast.ops, gptfast.model, gptfast.training, gptfast.generate, gptfast.integrations;"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_loss_and_every_gradient_match_transformers(backend, attention_calls):
    theirs, ours, patch = pair(backend)
    assert (patch.attention_layers, patch.layer_norms, patch.gelus, patch.fused_loss) == (2, 5, 2, True)
    assert ours.config._attn_implementation == "gptfast" and theirs.config._attn_implementation != "gptfast"
    x = tokens(2, 37)
    with torch.no_grad():                              # eval, no labels: logits
        assert rel_error(ours.eval()(x).logits, theirs.eval()(x).logits) < 1e-5
    assert attention_calls and all(c[3] == backend for c in attention_calls)
    labels = x.clone()
    labels[0, :5] = -100                              # ignored positions
    ours.train(), theirs.train()
    out_ours, out_theirs = ours(x, labels=labels), theirs(x, labels=labels)
    assert out_ours.logits is None                    # training with labels: the LM head fused with the loss
    assert rel_error(out_ours.loss, out_theirs.loss) < 1e-5
    out_ours.loss.backward(), out_theirs.loss.backward()
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        assert rel_error(p_ours.grad, p_theirs.grad) < 1e-5, name
    asked = ours(x, labels=labels, skip_logits=False)             # logits when asked for, same loss
    assert rel_error(asked.logits, out_theirs.logits) < 1e-5 and rel_error(asked.loss, out_theirs.loss) < 1e-5
    with torch.no_grad():                             # eval with labels: logits and loss
        ours.eval(), theirs.eval()
        e_ours, e_theirs = ours(x, labels=labels), theirs(x, labels=labels)
        assert rel_error(e_ours.logits, e_theirs.logits) < 1e-5 and rel_error(e_ours.loss, e_theirs.loss) < 1e-5
        as_tuple = ours(x, labels=labels, return_dict=False)
        assert rel_error(as_tuple[0], e_theirs.loss) < 1e-5 and as_tuple[1].shape == (2, 37, 211)


def test_the_loss_follows_transformers_semantics():
    """shift inside, ignore_index, num_items_in_batch (the sum over it), shift_labels - against HF's own
    ForCausalLMLoss; a batch whose every label is ignored gives 0 and a zero gradient with num_items."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    labels = torch.randint(0, 30, (2, 9))
    labels[1, 3:6] = -100
    for kw in ({}, {"num_items_in_batch": torch.tensor(40)}, {"num_items_in_batch": 7},
               {"shift_labels": torch.randint(0, 30, (2, 9))}):
        theirs = ForCausalLMLoss(hidden @ weight.t(), labels, 30, **kw)
        fused = gi.causal_lm_loss(labels, hidden=hidden, weight=weight, backend="extension", **kw)
        from_logits = gi.causal_lm_loss(labels, logits=hidden @ weight.t(), backend="extension", **kw)
        assert rel_error(fused, theirs) < 1e-6 and rel_error(from_logits, theirs) < 1e-6, kw
    nothing = torch.full((2, 9), -100)
    loss = gi.causal_lm_loss(nothing, hidden=hidden, weight=weight, backend="extension", num_items_in_batch=5)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_attn_implementation_alone_through_from_pretrained(tmp_path, attention_calls):
    theirs = random_model(tiny_config(), seed=2).eval()
    theirs.save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="gptfast").eval()
    assert isinstance(ours.transformer.ln_f, torch.nn.LayerNorm) and type(ours.transformer.ln_f) is torch.nn.LayerNorm
    x = tokens(3, 20)
    with torch.no_grad():
        assert rel_error(ours(x).logits, theirs(x).logits) < 1e-5
    assert len(attention_calls) == 2 and attention_calls[0][:3] == (20, 20, 0.0)
    other = random_model(tiny_config(), seed=2).eval()
    other.set_attn_implementation("gptfast")            # the setter works as well
    with torch.no_grad():
        assert rel_error(other(x).logits, theirs(x).logits) < 1e-5
    assert len(attention_calls) == 4


def test_attention_dropout_goes_to_our_op_in_training_only(attention_calls):
    _, ours, _ = pair("extension", dropout=0.1)
    x = tokens(2, 16)
    ours.train()(x, labels=x).loss.backward()
    with torch.no_grad():
        ours.eval()(x)
    assert [c[2] for c in attention_calls] == [0.1, 0.1, 0.0, 0.0]


def test_padding_falls_back_to_sdpa_with_one_warning_and_exact_results(attention_calls):
    theirs, ours, _ = pair("extension")
    x = tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0                                   # left padding
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        a, b = ours.eval()(x, attention_mask=mask), ours(x, attention_mask=mask)
        ref = theirs.eval()(x, attention_mask=mask)
    said = [w for w in caught if issubclass(w.category, gi.GptfastFallbackWarning)]
    assert len(said) == 1 and "padding" in str(said[0].message) and "sdpa" in str(said[0].message)
    assert not attention_calls                        # nothing ran on our op
    assert rel_error(a.logits[:, 4:], ref.logits[:, 4:]) < 1e-5 and torch.equal(a.logits, b.logits)
    with torch.no_grad():                             # an all-ones mask is the plain causal one: our op
        assert rel_error(ours(x, attention_mask=torch.ones_like(mask)).logits, theirs(x).logits) < 1e-5
    assert len(attention_calls) == 2


def test_output_attentions_and_cross_attention_fall_back(attention_calls):
    theirs, ours, _ = pair("extension")
    theirs.set_attn_implementation("eager")
    x = tokens(1, 10)
    with pytest.warns(gi.GptfastFallbackWarning, match="output_attentions"), torch.no_grad():
        got = ours.eval()(x, output_attentions=True)
    with torch.no_grad():
        want = theirs.eval()(x, output_attentions=True)
    assert len(got.attentions) == 2 and all(rel_error(g, w) < 1e-5 for g, w in zip(got.attentions, want.attentions))
    theirs, ours, _ = pair("extension", add_cross_attention=True)
    encoder = torch.randn(1, 6, 128)
    with pytest.warns(gi.GptfastFallbackWarning, match="cross-attention"), torch.no_grad():
        got = ours.eval()(x, encoder_hidden_states=encoder).logits
    with torch.no_grad():
        assert rel_error(got, theirs.eval()(x, encoder_hidden_states=encoder).logits) < 1e-5
    assert attention_calls and all(c[0] == c[1] == 10 for c in attention_calls)   # self-attention still ours


def test_greedy_generate_with_the_kv_cache_gives_transformers_tokens(attention_calls):
    theirs, ours, _ = pair("auto", seed=3)
    prompt = tokens(2, 5, seed=4)
    want = theirs.eval().generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = ours.eval().generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert (1, 6) in {c[:2] for c in attention_calls}    # decoding steps ran on our op with the cache


@pytest.mark.slow
def test_torch_compile_of_the_patched_model():
    theirs, ours, _ = pair("extension", seed=5)
    compiled = torch.compile(ours, fullgraph=True)
    x = tokens(2, 16)
    ours.train(), theirs.train()
    loss = compiled(x, labels=x).loss
    loss.backward()
    ref = theirs(x, labels=x).loss
    ref.backward()
    assert rel_error(loss, ref) < 1e-5
    assert rel_error(ours.transformer.h[0].attn.c_attn.weight.grad, theirs.transformer.h[0].attn.c_attn.weight.grad) < 1e-5


def test_save_and_from_pretrained_round_trip(tmp_path):
    theirs, ours, _ = pair("extension", seed=6)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert "gptfast" not in (tmp_path / "ours" / "config.json").read_text().lower()
    cfg_ours, cfg_theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs"))
    assert cfg_ours == cfg_theirs
    assert set(ours.state_dict()) == set(theirs.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="gptfast")
    gi.apply_gptfast(back, backend="extension")
    x = tokens(2, 9)
    with torch.no_grad():
        assert rel_error(back.eval()(x).logits, theirs.eval()(x).logits) < 1e-5


def test_class_level_form_patches_models_built_afterwards(tmp_path):
    random_model(tiny_config(), seed=7).save_pretrained(tmp_path)
    gi.apply_gptfast_to_gpt2(backend="reference")
    try:
        built = GPT2LMHeadModel(tiny_config())
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        gi.revert_gptfast_for_gpt2()
    for model in (built, loaded):
        assert model.config._attn_implementation == "gptfast"
        assert isinstance(model.transformer.ln_f, gi.GptfastLayerNorm)
        assert isinstance(model.transformer.h[1].mlp.act, gi.GptfastGELU)
        assert model.transformer.h[1].attn.gptfast_backend == "reference" and "forward" in vars(model)
    after = GPT2LMHeadModel(tiny_config())
    assert type(after.transformer.ln_f) is torch.nn.LayerNorm and after.config._attn_implementation != "gptfast"
    x = tokens(1, 8)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_error(loaded.eval()(x).logits, plain.eval()(x).logits) < 1e-5


def test_a_gptfast_export_loads_with_our_attention_and_computes_what_we_compute(tmp_path):
    from gptfast.model import GPTConfig, GPTModel, export_hf
    from gptfast.tokenizer import get_tokenizer

    torch.manual_seed(8)
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                    qkv_bias=True, tie_embeddings=True, backend="reference")
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf(model, str(tmp_path), tokenizer=get_tokenizer("gpt2"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="gptfast").eval()
    gi.apply_gptfast(theirs, backend="auto")
    x = tokens(2, 20, vocab=50257)
    with torch.no_grad():
        assert rel_error(theirs(x).logits, model(x)) < 1e-5


def test_trainer_runs_the_patched_model_and_matches_the_unpatched_one(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs the `accelerate` test extra",
                        exc_type=ImportError)
    data = [{"input_ids": t, "labels": t.clone()} for t in tokens(8, 16, seed=9)]

    def run(model, name):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    theirs, ours, _ = pair("extension", seed=10)
    before = ours.transformer.wte.weight.detach().clone()
    losses_ours, losses_theirs = run(ours, "ours"), run(theirs, "theirs")
    assert len(losses_ours) == 3 and all(torch.isfinite(torch.tensor(losses_ours)))
    assert not torch.equal(before, ours.transformer.wte.weight)
    assert losses_ours == pytest.approx(losses_theirs, rel=1e-4)
    assert rel_error(ours.transformer.wte.weight.detach(), theirs.transformer.wte.weight.detach()) < 1e-5


def test_clear_errors_and_what_is_left_alone():
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    with pytest.raises(TypeError, match="GPT-2.*Llama and Qwen3.*MistralForCausalLM.*'mistral'"):
        gi.apply_gptfast(mistral)
    with pytest.raises(ops.BackendError):
        gi.apply_gptfast(random_model(tiny_config()), backend="no-such-backend")
    relu = random_model(tiny_config(activation_function="relu"))
    patch = gi.apply_gptfast(relu, backend="torch")
    assert patch.gelus == 0 and any("'relu' is not the tanh GELU" in s for s in patch.left_alone)
    base = transformers.GPT2Model(tiny_config())
    patch = gi.apply_gptfast(base, backend="torch")
    assert patch.layer_norms == 5 and not patch.fused_loss and any("no LM head" in s for s in patch.left_alone)


def test_a_prefill_that_continues_a_cache_is_causal_at_the_last_positions(attention_calls):
    """Three new tokens after five cached ones: on our op (Tq = 3 < Tk = 8, queries at the last positions),
    and through a fallback, which must get the mask spelled out (SDPA's is_causal would align it to the first)."""
    theirs, ours, _ = pair("extension", seed=11)
    x = tokens(1, 8)
    with torch.no_grad():
        first = ours.eval()(x[:, :5], use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        name = "cache" if "cache" in inspect.signature(ours.forward).parameters else "past_key_values"
        rest = ours(x[:, 5:], **{name: cache}).logits
        want = theirs.eval()(x).logits[:, 5:]
    assert rel_error(rest, want) < 1e-5 and (3, 8) in {c[:2] for c in attention_calls}
    module = ours.transformer.h[0].attn
    q, k, v = torch.randn(1, 2, 3, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    mine, _ = gi.gptfast_attention_forward(module, q, k, v, None)
    with pytest.warns(gi.GptfastFallbackWarning, match="head_mask"):
        handed_on, _ = gi.gptfast_attention_forward(module, q, k, v, None, head_mask=torch.ones(2))
    assert rel_error(handed_on, mine) < 1e-5
    scores = (q @ k.transpose(-1, -2) / 8.0).masked_fill(~torch.ones(3, 8, dtype=torch.bool).tril(5), float("-inf"))
    assert rel_error(mine, (scores.softmax(-1) @ v).transpose(1, 2)) < 1e-5


def test_other_models_use_the_attention_grouped_query_attention_included(attention_calls):
    """The attention interface is model-agnostic: a tiny Llama (rotary positions applied before it) on
    "gptfast" computes what it computes on SDPA, with as many key/value heads as query heads or fewer."""
    for kv_heads, ours_runs in ((2, True), (1, True)):
        torch.manual_seed(12)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=kv_heads, attention_dropout=0.0)
        theirs = transformers.LlamaForCausalLM(config).eval()
        ours = copy.deepcopy(theirs)
        ours.set_attn_implementation("gptfast")
        x = tokens(2, 11, vocab=64)
        attention_calls.clear()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            assert rel_error(ours(x).logits, theirs(x).logits) < 1e-5
        assert bool(attention_calls) == ours_runs
        assert not [w for w in caught if issubclass(w.category, gi.GptfastFallbackWarning)]

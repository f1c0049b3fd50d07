import pytest
import torch

from conftest import rel_error
from gptfast import ops
from gptfast.model import PRESETS, GPTConfig, GPTModel, build_model, config_from_preset


def small_config(**kw):
    base = dict(vocab_size=97, context_length=32, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0)
    return GPTConfig(**{**base, **kw})


def expected_parameters(c: GPTConfig) -> int:
    C, V = c.emb_dim, c.vocab_size
    attn = 3 * C * C + (3 * C if c.qkv_bias else 0) + C * C + C
    ff = C * 4 * C + 4 * C + 4 * C * C + C
    block = attn + ff + 2 * 2 * C
    return V * C + c.context_length * C + c.n_layers * block + 2 * C + C * V


def expected_llama_parameters(c) -> int:
    C, V, hs, F = c.emb_dim, c.vocab_size, c.head_dim, c.hidden_dim
    attn = C * c.n_heads * hs + 2 * C * c.n_kv_heads * hs + c.n_heads * hs * C + (2 * hs if c.qk_norm else 0)
    block = attn + 3 * C * F + 2 * C                             # + the two RMSNorms' weights
    return V * C + c.n_layers * block + C + (0 if c.tie_embeddings else C * V)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts(preset):
    cfg = config_from_preset(preset)
    with torch.device("meta"):                        # shapes only: no memory, no init time
        model = build_model(cfg)
    expected = expected_parameters(cfg) if isinstance(cfg, GPTConfig) else expected_llama_parameters(cfg)
    assert model.num_parameters() == expected


def test_the_released_shapes_have_their_published_sizes():
    """Qwen3-0.6B: 0.6B parameters, 0.44B without the (tied) embedding; Llama 3.2 1B: 1.24B (tied)."""
    with torch.device("meta"):
        qwen, llama = build_model(config_from_preset("qwen3-0.6b")), build_model(config_from_preset("llama3.2-1b"))
    assert qwen.num_parameters() == 596_049_920 and qwen.num_parameters() - 151936 * 1024 == 440_467_456
    assert llama.num_parameters() == 1_235_814_400


def test_gpt2_124m_has_the_books_parameter_count():
    with torch.device("meta"):
        assert GPTModel(GPTConfig.from_preset("gpt2-124m")).num_parameters() == 163_009_536
        # the book-124m preset differs only by its 256-token context: 768 x 768 fewer positions
        assert GPTModel(GPTConfig.from_preset("book-124m")).num_parameters() == 163_009_536 - 768 * 768


def test_book_preset_matches_the_book():
    c = GPTConfig.from_preset("book-124m")
    assert (c.vocab_size, c.context_length, c.emb_dim, c.n_heads, c.n_layers, c.drop_rate, c.qkv_bias) == \
        (50257, 256, 768, 12, 12, 0.1, False)


def test_forward_shapes_and_context_limit():
    torch.manual_seed(0)
    model = GPTModel(small_config())
    idx = torch.randint(0, 97, (3, 17))
    assert model(idx).shape == (3, 17, 97)
    assert model(idx[:1, :1]).shape == (1, 1, 97)
    with pytest.raises(ValueError, match="sequence length 33 exceeds the model's context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(emb_dim=50, n_heads=4)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        GPTConfig.from_preset("huge")
    with pytest.raises(ValueError, match="n_layers must be positive"):
        GPTConfig(n_layers=0)
    with pytest.raises(ops.BackendError, match="unknown op backend"):
        GPTModel(small_config(backend="nope"))


def test_model_is_causal():
    torch.manual_seed(0)
    model = GPTModel(small_config()).eval()
    idx = torch.randint(0, 97, (1, 20))
    idx2 = idx.clone()
    idx2[0, 12:] = (idx2[0, 12:] + 1) % 97
    a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_reference_and_torch_backends_agree_in_float32():
    torch.manual_seed(0)
    model = GPTModel(small_config(backend="reference")).eval()
    idx = torch.randint(0, 97, (2, 31))
    targets = torch.randint(0, 97, (2, 31))

    def logits_and_grads(backend):
        model.set_backend(backend)
        model.zero_grad()
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref_logits, ref_grads = logits_and_grads("reference")
    logits, grads = logits_and_grads("torch")
    assert rel_error(logits, ref_logits) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < 1e-5


def test_set_backend_reaches_every_op_module(monkeypatch):
    model = GPTModel(small_config(backend="reference"))
    model.set_backend("torch")
    holders = [m for m in model.modules() if m is not model and hasattr(m, "backend")]
    # per block: 2 LayerNorms, attention, GELU, 6 linear layers (Q, K, V, out, fc, proj), the residual dropout,
    # the block itself (its fused decoding step); the embedding dropout, the final LN, the LM head
    assert len(holders) == 2 * 12 + 3
    assert {m.backend for m in holders} == {"torch"} and model.backend == "torch"
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    assert GPTModel(small_config()).backend == "reference"


def test_config_is_not_mutated_and_round_trips():
    cfg = small_config()
    model = GPTModel(cfg)
    assert cfg.backend is None and model.cfg.backend == ops.resolve_backend_name(None)
    assert GPTConfig.from_dict(model.cfg.to_dict()) == model.cfg


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    model = GPTModel(small_config(drop_rate=0.3))
    idx = torch.randint(0, 97, (2, 16))
    model.eval()
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
@pytest.mark.slow
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    model = GPTModel(small_config(backend=backend)).eval()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))

    def loss_fn(m):
        return torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), targets.flatten())

    eager = loss_fn(model)
    eager.backward()
    eager_grad = model.out_head.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    loss = loss_fn(compiled)
    loss.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6)
    assert rel_error(model.out_head.weight.grad, eager_grad) < 1e-4


def test_tied_embeddings_start_near_uniform_predictions():
    """The shared matrix gets GPT-2's N(0, 0.02): an untrained model's loss is close to ln V."""
    import math

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", tie_embeddings=True)).eval()
    assert model.out_head.weight is model.tok_emb.weight
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    idx = torch.randint(0, 50257, (2, 32))
    loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - math.log(50257)) < 0.5


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

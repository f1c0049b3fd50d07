"""ops.decode_model, a whole model's one-token step in one call (csrc/cpu/decode_block.cpp `decode_blocks`,
csrc/cpu/decode_block_llama.cpp `decode_blocks_llama`): bit-for-bit the per-block and the op-by-op extension paths
inside GPT-2 and Qwen3/Llama models, the model's choice of path, against the float64 twin at GPT-2's widths,
opcheck, the kernels' own refusals. (Odd shapes and bad inputs through the interface: its cases, test_op_contract.)"""
import copy

import pytest
import torch

from conftest import rel_error
from gptfast import ops
from gptfast.compiled import set_poison_outputs
from gptfast.generate import decode_step, generate
from gptfast.model import build_model
from gptfast.model.config import GPTConfig, LlamaConfig
from gptfast.model.quantize import quantize
from gptfast.ops.decode_model import kernel_args, reference, to_float64


@pytest.fixture(autouse=True)
def poisoned_outputs():
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def config(family, **kw):
    if family == "gpt2":
        base = dict(vocab_size=101, context_length=24, emb_dim=96, n_heads=3, n_layers=3, drop_rate=0.1,
                    qkv_bias=True, backend="extension")
        base.update(kw)
        return GPTConfig(**base)
    base = dict(vocab_size=97, context_length=24, emb_dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16,
                n_layers=3, qk_norm=family == "qwen3", backend="extension", tie_embeddings=family == "qwen3")
    base.update(kw)
    return LlamaConfig(**base)


def trained_like_model(cfg, quantization="none", seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():                                        # norms off their start, like a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return quantize(model, quantization) if quantization != "none" else model


def count_calls(monkeypatch, name):
    """Calls of ops.<name>; "decode_model": of the whole-model step as the model runs it (a bound ops.DecodeStep);
    "DecodeStep": bindings."""
    calls = []
    owner, attr = {"decode_model": (ops.DecodeStep, "__call__"), "DecodeStep": (ops.DecodeStep, "__init__")}.get(
        name, (ops, name))
    real = getattr(owner, attr)
    monkeypatch.setattr(owner, attr, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "llama"])
@pytest.mark.parametrize("quantization", ["none", "bf16", "int8", "w8a8", "int4"])
@pytest.mark.parametrize("batch", [1, 5])
def test_whole_step_is_bitwise_per_block_and_op_by_op(family, quantization, batch, monkeypatch):
    """Logits and caches: one call a token = one call a block = the ops one by one, to the bit."""
    model = trained_like_model(config(family), quantization)
    idx = torch.randint(0, 97, (batch, 6), generator=torch.Generator().manual_seed(3))
    block_op = "decode_block" if family == "gpt2" else "decode_block_llama"
    results = []
    for fused in (True, "blocks", False):
        whole, blocks = count_calls(monkeypatch, "decode_model"), count_calls(monkeypatch, block_op)
        with torch.inference_mode():
            cache = model.new_kv_cache(batch, fused=fused)
            model(idx, cache=cache, start_pos=0)
            logits = [decode_step(model, idx[:, i:i + 1], cache, 6 + i) for i in range(4)]
        assert (len(whole), len(blocks)) == {True: (4, 0), "blocks": (0, 12), False: (0, 0)}[fused]
        results.append((torch.cat(logits), [t for layer in cache.layers for t in (layer.k, layer.v)]))
    for logits, caches in results[1:]:
        assert torch.equal(logits, results[0][0])
        assert all(torch.equal(a[:, :, :10], b[:, :, :10]) for a, b in zip(caches, results[0][1]))


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
@pytest.mark.parametrize("quantization", ["int8", "w8a8", "int4-g64"])
def test_generation_uses_it_and_agrees_with_the_textbook(family, quantization, monkeypatch):
    model = trained_like_model(config(family), quantization, seed=1)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    calls = count_calls(monkeypatch, "decode_model")
    fused = generate(model, prompt, max_new_tokens=12)
    assert len(calls) == 11                                      # every step after the prefill: one call
    ref = generate(copy.deepcopy(model).set_backend("reference"), prompt, max_new_tokens=12)
    assert torch.equal(fused, ref)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backends_without_it_go_op_by_op(backend, monkeypatch):
    model = trained_like_model(config("qwen3", backend=backend))
    calls = count_calls(monkeypatch, "decode_model")
    assert generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4).shape == (1, 7) and calls == []


def test_not_with_autograd(monkeypatch):
    model = trained_like_model(config("gpt2"))
    calls = count_calls(monkeypatch, "decode_model")
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache, start_pos=0)
    assert model(torch.tensor([[3]]), cache=cache, start_pos=2).requires_grad and calls == []


def test_a_cache_binds_its_model_once(monkeypatch):
    """The weights are gathered and checked on the first one-token step only; another model on the same cache binds
    again (and gives that model's own logits); grad mode on with trainable weights leaves the bound step alone."""
    model, other = (trained_like_model(config("qwen3"), "int8", seed=s) for s in (1, 2))
    binds = count_calls(monkeypatch, "DecodeStep")
    idx = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        cache = model.new_kv_cache(1)
        model(idx, cache=cache, start_pos=0)
        for i in range(4):
            model(idx[:, :1], cache=cache, start_pos=3 + i)
        assert len(binds) == 1
        got = other(idx[:, :1], cache=cache, start_pos=7)
        assert len(binds) == 2
        fresh = model_cache_copy(other, [(kv.k, kv.v) for kv in cache.layers])
        assert torch.equal(got, other(idx[:, :1], cache=fresh, start_pos=7))
    trainable = trained_like_model(config("gpt2"))
    cache = trainable.new_kv_cache(1)
    with torch.no_grad():
        trainable(idx, cache=cache, start_pos=0)
        trainable(idx[:, :1], cache=cache, start_pos=3)
    assert trainable(idx[:, :1], cache=cache, start_pos=4).requires_grad      # autograd: op by op again


def test_a_bound_step_refuses_what_changed():
    model = trained_like_model(config("qwen3"), "int8")
    cache = model.new_kv_cache(2)
    with torch.inference_mode():
        x = model.tok_emb(torch.tensor([[1], [2]]))
        cos, sin = model.rope_angles(0, 1)
        step = ops.DecodeStep(x, model_weights(model, torch.tensor([[1], [2]]), cache, 0)[1],
                              [kv.k for kv in cache.layers], [kv.v for kv in cache.layers], (cos, sin),
                              backend="extension")
        assert torch.equal(step(x, 1, (cos, sin)), ops.decode_model(
            x, step.weights, step.k_caches, step.v_caches, 1, (cos, sin), backend="extension"))
        for call, message in [(lambda: step(x[:1], 1, (cos, sin)), r"x must be a float32 \(2, 1, 64\)"),
                              (lambda: step(x.double(), 1, (cos, sin)), "x must be a float32"),
                              (lambda: step(x, 24, (cos, sin)), r"start_pos must be in \[0, 24\)"),
                              (lambda: step(x, -1, (cos, sin)), "start_pos must be in"),
                              (lambda: step(x, 1, None), "rope: "),
                              (lambda: step(x, 1, (cos[:, :3], sin)), r"cos must be a float32 \(1, 8\)"),
                              (lambda: step(x, 1, (cos, sin.double())), "sin must be a float32")]:
            with pytest.raises(ValueError, match=message):
                call()
    trainable = trained_like_model(config("qwen3"))
    cache = trainable.new_kv_cache(1)
    with torch.no_grad():
        x = trainable.tok_emb(torch.tensor([[1]]))
        w = model_weights(trainable, torch.tensor([[1]]), cache, 0)[1]
        step = ops.DecodeStep(x, w, [kv.k for kv in cache.layers], [kv.v for kv in cache.layers], (cos, sin),
                              backend="extension")
    with pytest.raises(RuntimeError, match="for inference"):
        step(x, 1, (cos, sin))


def model_weights(model, x, cache, start_pos):
    """The arguments of decode_model as run_model's bound step passes them, caught on the way."""
    seen = []
    real = ops.DecodeStep.__call__
    ops.DecodeStep.__call__ = lambda self, x, p, rope=None: seen.append(
        (x, self.weights, self.k_caches, self.v_caches, p, rope)) or real(self, x, p, rope)
    try:
        with torch.inference_mode():
            model(x, cache=cache, start_pos=start_pos)
    finally:
        ops.DecodeStep.__call__ = real
    return seen[0]


def test_gpt2_widths_against_the_float64_twin():
    """GPT-2's own widths (C 768, 12 heads, V 50304), two int8 blocks: the kernel within 1e-5 of the float64 twin."""
    cfg = config("gpt2", emb_dim=768, n_heads=12, n_layers=2, vocab_size=50257, vocab_multiple=128, context_length=16)
    model = trained_like_model(cfg, "int8")
    cache = model.new_kv_cache(2)
    idx = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(idx, cache=cache, start_pos=0)
        before = [(kv.k.clone(), kv.v.clone()) for kv in cache.layers]
    x, w, ks, vs, p, rope = model_weights(model, idx[:, :1], cache, 5)
    ks64, vs64 = [k.double() for k, _ in before], [v.double() for _, v in before]
    ref = reference(x.double(), to_float64(w), ks64, vs64, p)
    with torch.inference_mode():
        got = model(idx[:, :1], cache=model_cache_copy(model, before), start_pos=5)
    assert got.shape == (2, 1, 50304) and rel_error(got, ref) < 1e-5


def model_cache_copy(model, kv_pairs):
    cache = model.new_kv_cache(kv_pairs[0][0].shape[0])
    for layer, (k, v) in zip(cache.layers, kv_pairs):
        layer.k.copy_(k), layer.v.copy_(v)
    return cache


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_opcheck(family):
    model = trained_like_model(config(family, n_layers=2), "int8")
    cache = model.new_kv_cache(2)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, start_pos=0)
    x, w, ks, vs, p, rope = model_weights(model, torch.tensor([[7], [8]]), cache, 3)
    args = kernel_args(x.clone(), w, [k.clone() for k in ks], [v.clone() for v in vs], p, rope)
    set_poison_outputs(False)                                    # opcheck compares runs: no NaN fill in between
    kernel = torch.ops.gptfast.decode_blocks if family == "gpt2" else torch.ops.gptfast.decode_blocks_llama
    torch.library.opcheck(kernel.default, args)


def test_the_kernels_called_directly_refuse_what_their_loops_cannot_take():
    for family in ("gpt2", "qwen3"):
        model = trained_like_model(config(family, n_layers=2), "int8")
        cache = model.new_kv_cache(1)
        with torch.inference_mode():
            model(torch.tensor([[1, 2]]), cache=cache, start_pos=0)
        x, w, ks, vs, p, rope = model_weights(model, torch.tensor([[3]]), cache, 2)
        kernel = torch.ops.gptfast.decode_blocks if family == "gpt2" else torch.ops.gptfast.decode_blocks_llama
        head_at = -4                                           # (..., head weight, scales, bias, int8_activations)
        for change, message in [
            (lambda a: a.__setitem__(6, a[6][:1]), "one cache a block"),
            (lambda a: a.__setitem__(2, a[2][:-1]), "a block"),
            (lambda a: a.__setitem__(head_at, a[head_at][:, :5].contiguous()), "head weight must be"),
            (lambda a: a.__setitem__(head_at + 1, None), "head weight is int8 and needs scales"),
        ]:
            a = list(kernel_args(x, w, ks, vs, p, rope))
            change(a)
            with pytest.raises(RuntimeError, match=message):
                kernel(*a)

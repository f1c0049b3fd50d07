"""ops.decode_block_llama, a whole Llama/Qwen3 block's one-token decoding step in one call
(csrc/cpu/decode_block_llama.cpp): against the float64 twin on odd shapes, groupings and every weight storage type,
bit-for-bit against the op-by-op extension path inside the model, the model's choice of path, opcheck, the kernel's
own refusals, torch.compile."""
import copy

import pytest
import torch

from conftest import rel_error
from gptfast import ops
from gptfast.compiled import set_poison_outputs
from gptfast.generate import decode_step, generate
from gptfast.model import build_model
from gptfast.model.config import LlamaConfig
from gptfast.model.kv_cache import decode_weights_llama
from gptfast.model.quantize import quantize, quantize_int8_rows
from gptfast.ops.decode_block_llama import kernel_args, reference, to_float64


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """The kernel's outputs and work buffers start as NaN: anything it forgets to write fails the test."""
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def make_layer(kind, N, K, seed, bias=False):
    w = rand(N, K, seed=seed, scale=K ** -0.5)
    b = rand(N, seed=seed + 1000, scale=0.1) if bias else None
    if kind == "int8":
        return ops.LinearWeights(*quantize_int8_rows(w), b)
    return ops.LinearWeights(w.to(torch.bfloat16) if kind == "bf16" else w, None, b)


def make_block(kind, C, Hq, Hkv, D, F, qk_norm, qkv_bias=False, seed=0):
    lay = lambda N, K, i, bias=False: make_layer(kind, N, K, seed + i, bias)   # noqa: E731
    norm = lambda n, i: 1 + rand(n, seed=seed + 50 + i, scale=0.1)            # noqa: E731
    return ops.LlamaBlockWeights(norm(C, 0), lay(Hq * D, C, 1, qkv_bias), lay(Hkv * D, C, 2, qkv_bias),
                                 lay(Hkv * D, C, 3, qkv_bias), lay(C, Hq * D, 4), norm(C, 1), lay(F, C, 5),
                                 lay(F, C, 6), lay(C, F, 7), norm(D, 2) if qk_norm else None,
                                 norm(D, 3) if qk_norm else None, 1e-6)


def angles(p, D):
    a = torch.arange(D // 2, dtype=torch.float64)[None] * (p + 1) * 0.21
    return a.cos().float(), a.sin().float()


# (B, Hq, Hkv, D, C, F, context, start_pos, qk_norm): groups 1, 2, 4, 8 (Qwen3-0.6B: 16/8, Llama 3.2 1B: 32/8),
# head dims 16-128 incl. 80, C unlike Hq * D (Qwen3-0.6B: 1024 vs 2048), C off the vector, the first position, a
# cache one short of full, batch 1 and the kernel's largest batch
SHAPES = [(1, 2, 1, 80, 160, 300, 8, 0, True), (3, 8, 1, 16, 100, 100, 130, 129, False),
          (16, 4, 4, 32, 128, 256, 20, 6, True), (2, 16, 8, 128, 1024, 384, 1001, 999, True),
          (5, 4, 2, 24, 33, 70, 9, 4, False), (2, 6, 3, 22, 1023, 130, 5, 3, True)]


@pytest.mark.parametrize("kind", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Hq{}_Hkv{}_D{}_C{}_F{}_ctx{}_p{}_qk{}".format(*s))
def test_against_float64_reference(kind, shape):
    B, Hq, Hkv, D, C, F, ctx, p, qk = shape
    weights = make_block(kind, C, Hq, Hkv, D, F, qk, qkv_bias=(B == 3), seed=B + D)
    x = rand(B, 1, C, seed=7)
    k_cache, v_cache = rand(B, Hkv, ctx, D, seed=8), rand(B, Hkv, ctx, D, seed=9)   # earlier rows: random
    k64, v64 = k_cache.double(), v_cache.double()
    cos, sin = angles(p, D)
    ref = reference(x.double(), to_float64(weights), k64, v64, p, cos.double(), sin.double())
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        y = ops.decode_block_llama(x, weights, k_cache, v_cache, p, cos, sin, backend="extension")
    assert y.shape == (B, 1, C) and y.dtype == torch.float32
    assert rel_error(y, ref) < 1e-5
    assert rel_error(k_cache[:, :, p], k64[:, :, p]) < 1e-5 and rel_error(v_cache[:, :, p], v64[:, :, p]) < 1e-5
    others = torch.ones(ctx, dtype=torch.bool)
    others[p] = False                                             # every other cache row untouched
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])


def test_strided_x_and_tables():
    """x and the angle tables as views with gaps give what their contiguous copies give."""
    weights = make_block("int8", 48, 4, 2, 12, 96, True, seed=4)
    x = rand(3, 1, 96, seed=5)[:, :, ::2]
    cos, sin = angles(5, 24)                                      # (1, 12): every other column is a 6-wide table
    cs, sn = cos[:, ::2], sin[:, ::2]
    assert not x.is_contiguous() and not cs.is_contiguous()
    k, v = rand(3, 2, 7, 12, seed=6), rand(3, 2, 7, 12, seed=7)
    k2, v2 = k.clone(), v.clone()
    with torch.no_grad():
        y = ops.decode_block_llama(x, weights, k, v, 5, cs, sn, backend="extension")
        y2 = ops.decode_block_llama(x.contiguous(), weights, k2, v2, 5, cs.contiguous(), sn.contiguous(),
                                    backend="extension")
    assert torch.equal(y, y2) and torch.equal(k, k2)


def tiny_config(**kw):
    base = dict(vocab_size=97, context_length=24, emb_dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16,
                n_layers=2, qk_norm=True, backend="extension")
    base.update(kw)
    return LlamaConfig(**base)


def trained_like_model(cfg, quantization="none", seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():                                        # norms off their start of ones, like a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return quantize(model, quantization) if quantization != "none" else model


def fused_calls(monkeypatch):
    calls = []
    real = ops.decode_block_llama
    monkeypatch.setattr(ops, "decode_block_llama", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("quantization", ["none", "bf16", "int8", "w8a8", "int4"])
@pytest.mark.parametrize("batch", [1, 5])
def test_model_step_is_bitwise_the_op_by_op_path(family, quantization, batch, monkeypatch):
    """Inside the model the fused block gives the very bits of the extension ops one by one: logits and caches."""
    cfg = tiny_config(qk_norm=family == "qwen3", n_kv_heads=2 if family == "qwen3" else 1)
    model = trained_like_model(cfg, quantization)
    idx = torch.randint(0, 97, (batch, 6), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        calls = fused_calls(monkeypatch)
        with torch.inference_mode():
            cache = model.new_kv_cache(batch, fused="blocks" if fused else False)   # (True: the whole model)
            model(idx, cache=cache, start_pos=0)
            logits = [decode_step(model, idx[:, i:i + 1], cache, 6 + i) for i in range(4)]
        assert len(calls) == (4 * cfg.n_layers if fused else 0)
        results.append((torch.cat(logits), [t for layer in cache.layers for t in (layer.k, layer.v)]))
    (l1, c1), (l2, c2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a[:, :, :10], b[:, :, :10]) for a, b in zip(c1, c2))


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_generation_uses_it_and_agrees_with_the_textbook(quantization, monkeypatch):
    model = trained_like_model(tiny_config(), quantization, seed=1)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    calls = fused_calls(monkeypatch)
    fused = generate(model, prompt, max_new_tokens=12, fused_decoding="blocks")   # (True: the whole model)
    assert len(calls) == 11 * model.cfg.n_layers                 # every step after the prefill
    ref = generate(copy.deepcopy(model).set_backend("reference"), prompt, max_new_tokens=12)
    assert torch.equal(fused, ref)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backends_without_it_go_op_by_op(backend, monkeypatch):
    model = trained_like_model(tiny_config(backend=backend))
    calls = fused_calls(monkeypatch)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 7) and calls == []


def test_not_in_training_nor_with_autograd(monkeypatch):
    model = trained_like_model(tiny_config())
    calls = fused_calls(monkeypatch)
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache, start_pos=0)
    logits = model(torch.tensor([[3]]), cache=cache, start_pos=2)    # grad enabled, parameters require grad
    assert logits.requires_grad and calls == []
    assert decode_weights_llama(model.trf_blocks[0]) is None
    with torch.no_grad():
        weights = decode_weights_llama(model.trf_blocks[0])
    cos, sin = angles(3, 16)
    with pytest.raises(RuntimeError, match="inference"):
        ops.decode_block_llama(torch.randn(1, 1, 64, requires_grad=True), weights, cache.layers[0].k,
                               cache.layers[0].v, 3, cos, sin, backend="extension")


def test_auto_follows_its_linear_choice():
    model = trained_like_model(tiny_config(backend="auto"), "int8")
    with torch.no_grad():
        weights = decode_weights_llama(model.trf_blocks[0])
    x, k = torch.randn(1, 1, 64), model.new_kv_cache(1).layers[0].k
    picked = ops.auto.choose("linear_int8", "cpu", "float32").backend
    assert ops.fuses_decode_block_llama(x, weights, k, backend="auto") == (picked == "extension")
    assert not ops.fuses_decode_block_llama(x.double(), weights, k, backend="auto")


@pytest.mark.slow
def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    model = trained_like_model(tiny_config(), "int8")
    idx = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(5))
    outs = []
    for compile in (False, True):
        with torch.inference_mode():
            cache = model.new_kv_cache(2)
            model(idx, cache=cache, start_pos=0)
            outs.append(torch.cat([decode_step(model, idx[:, :1], cache, 4 + i, compile=compile) for i in range(4)]))
    assert torch.equal(outs[0], outs[1])
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_opcheck(kind):
    weights = make_block(kind, 32, 4, 2, 8, 48, qk_norm=kind == "int8", seed=2)
    cos, sin = angles(3, 8)
    args = kernel_args(rand(2, 1, 32, seed=1), weights, rand(2, 2, 6, 8, seed=2), rand(2, 2, 6, 8, seed=3), 3, cos, sin)
    set_poison_outputs(False)                                    # opcheck compares runs: no NaN fill in between
    torch.library.opcheck(torch.ops.gptfast.decode_block_llama.default, args)


def test_the_kernel_called_directly_refuses_what_its_loops_cannot_take():
    """The interface's checks name each argument (the op's bad_inputs, test_op_contract); the kernel op itself,
    called directly, still refuses what would read out of bounds, with one line saying what."""
    W = make_block("int8", 32, 4, 2, 8, 48, qk_norm=True, seed=3)
    x, k, v = rand(2, 1, 32, seed=1), rand(2, 2, 6, 8, seed=2), rand(2, 2, 6, 8, seed=3)
    cos, sin = angles(2, 8)
    kernel = torch.ops.gptfast.decode_block_llama
    cases = [
        (dict(x=x.double()), "x must be a contiguous float32"),
        (dict(x=rand(17, 1, 32, seed=1), k=rand(17, 2, 6, 8, seed=2), v=rand(17, 2, 6, 8, seed=2)), "1 <= B <= 16"),
        (dict(k=rand(2, 3, 6, 8, seed=2), v=rand(2, 3, 6, 8, seed=2)), "multiple of the cache's n_kv_heads = 3"),
        (dict(k=k.transpose(2, 3)), "k_cache and v_cache must be contiguous"),
        (dict(p=6), r"start_pos must be in \[0, 6\)"),
        (dict(cos=torch.ones(1, 8)), "cos and sin must be"),
        (dict(W=W._replace(q=W.q._replace(scales=None))), "q weight is int8 and needs scales"),
        (dict(W=W._replace(up=W.up._replace(weight=W.up.weight[:, :16].contiguous()))), r"up weight must be"),
        (dict(W=W._replace(down=W.down._replace(bias=torch.zeros(5)))), "down bias must be a contiguous float32"),
        (dict(W=W._replace(k_norm=torch.ones(7))), "norms must be"),
    ]
    for change, message in cases:
        a = dict(W=W, x=x, k=k, v=v, p=2, cos=cos, sin=sin)
        a.update(change)
        with pytest.raises(RuntimeError, match=message):
            kernel(*kernel_args(a["x"], a["W"], a["k"], a["v"], a["p"], a["cos"], a["sin"]))


def test_qwen3_shapes_bitwise_and_batch_rows_independent():
    """Qwen3-0.6B's own widths (C 1024, 16 query heads of 128 over 8 K/V heads): a batch of 8 gives each sequence
    the bits it gets alone."""
    cfg = tiny_config(emb_dim=1024, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=384, n_layers=1,
                      vocab_size=64, context_length=16)
    model = trained_like_model(cfg, "int8")
    idx = torch.randint(0, 64, (8, 3), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        cache = model.new_kv_cache(8)
        model(idx, cache=cache, start_pos=0)
        batched = decode_step(model, idx[:, :1], cache, 3)
        for b in (0, 5):                                         # the same cache rows, alone
            c1 = model.new_kv_cache(1)
            for one, all_ in zip(c1.layers, cache.layers):
                one.k.copy_(all_.k[b:b + 1]), one.v.copy_(all_.v[b:b + 1])
            assert torch.equal(decode_step(model, idx[b:b + 1, :1], c1, 3), batched[b:b + 1])

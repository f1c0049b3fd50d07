"""ops.decode_block, a whole transformer block's one-token decoding step in one call (csrc/cpu/decode_block.cpp):
against the float64 reference twin on odd shapes and every weight storage type, bit-for-bit against the
op-by-op extension path inside the model, bad input, opcheck, the model's choice of path, torch.compile."""
import pytest
import torch

from conftest import rel_error
from gptfast import ops
from gptfast.compiled import set_poison_outputs
from gptfast.generate import decode_step, generate
from gptfast.model import GPTModel
from gptfast.model.config import GPTConfig
from gptfast.model.kv_cache import decode_weights
from gptfast.model.quantize import quantize, quantize_int8_rows
from gptfast.ops import reference
from gptfast.ops.decode_block import kernel_args as decode_block_kernel_args


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """The kernel's outputs and work buffers start as NaN: anything it forgets to write fails the test."""
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def make_layer(kind, N, K, seed, bias=True):
    w = rand(N, K, seed=seed, scale=K ** -0.5)
    b = rand(N, seed=seed + 1000, scale=0.1) if bias else None
    if kind == "int8":
        q, scales = quantize_int8_rows(w)
        return ops.LinearWeights(q, scales, b)
    return ops.LinearWeights(w.to(torch.bfloat16) if kind == "bf16" else w, None, b)


def make_block(kind, C, F, stacked, seed=0, bias=True):
    qkv = (make_layer(kind, 3 * C, C, seed + 1, bias),) if stacked else \
        tuple(make_layer(kind, C, C, seed + i, bias) for i in (1, 2, 3))
    return ops.BlockWeights(1 + rand(C, seed=seed + 10, scale=0.1), rand(C, seed=seed + 11, scale=0.1), qkv,
                            make_layer(kind, C, C, seed + 4, bias), 1 + rand(C, seed=seed + 12, scale=0.1),
                            rand(C, seed=seed + 13, scale=0.1), make_layer(kind, F, C, seed + 5, bias),
                            make_layer(kind, C, F, seed + 6, bias), 1e-5)


def to_float64(weights):
    """The block's weights for the float64 twin: int8 stays int8 (the twin dequantizes in float64), the rest widened."""
    def layer(L):
        w = L.weight if L.weight.dtype == torch.int8 else L.weight.double()
        return ops.LinearWeights(w, None if L.scales is None else L.scales.double(),
                                 None if L.bias is None else L.bias.double())
    W = weights
    return ops.BlockWeights(W.ln1_weight.double(), W.ln1_bias.double(), tuple(layer(L) for L in W.qkv), layer(W.out),
                            W.ln2_weight.double(), W.ln2_bias.double(), layer(W.fc), layer(W.proj), W.eps)


# (B, n_heads, head_dim, F, context, start_pos): head dims 16-128 incl. 80, F off the vector width,
# the first position, a cache one short of full, batch 1 and the kernel's largest batch
SHAPES = [(1, 2, 80, 640, 8, 0), (3, 3, 16, 100, 130, 129), (16, 1, 128, 512, 20, 6), (7, 4, 64, 1024, 1001, 999),
          (2, 5, 24, 360, 9, 4), (2, 1, 33, 70, 5, 3)]   # the last: C = 33, no whole vector in a row


@pytest.mark.parametrize("kind", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_D{}_F{}_ctx{}_p{}".format(*s))
def test_against_float64_reference(kind, shape):
    B, H, D, F, ctx, p = shape
    C = H * D
    weights = make_block(kind, C, F, stacked=(B % 2 == 1), seed=B + D, bias=(H != 4))
    x = rand(B, 1, C, seed=7)
    k_cache, v_cache = rand(B, H, ctx, D, seed=8), rand(B, H, ctx, D, seed=9)   # earlier positions: random, not zeros
    k64, v64 = k_cache.double(), v_cache.double()
    ref = reference.decode_block(x.double(), to_float64(weights), k64, v64, p)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        y = ops.decode_block(x, weights, k_cache, v_cache, p, backend="extension")
    assert y.shape == (B, 1, C) and y.dtype == torch.float32
    assert rel_error(y, ref) < 1e-5
    assert rel_error(k_cache[:, :, p], k64[:, :, p]) < 1e-5 and rel_error(v_cache[:, :, p], v64[:, :, p]) < 1e-5
    others = torch.ones(ctx, dtype=torch.bool)
    others[p] = False                                             # every other cache row untouched
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], v_before[:, :, others])


def test_strided_x():
    """x as a view with gaps (every other element of a wider tensor) gives what its contiguous copy gives."""
    weights = make_block("int8", 48, 192, stacked=True, seed=4)
    wide = rand(3, 1, 96, seed=5)
    x = wide[:, :, ::2]
    assert not x.is_contiguous()
    k, v = rand(3, 2, 7, 24, seed=6), rand(3, 2, 7, 24, seed=7)
    k2, v2 = k.clone(), v.clone()
    with torch.no_grad():
        y = ops.decode_block(x, weights, k, v, 5, backend="extension")
        assert torch.equal(y, ops.decode_block(x.contiguous(), weights, k2, v2, 5, backend="extension"))
    assert rel_error(y, reference.decode_block(x.double(), to_float64(weights), k.double(), v.double(), 5)) < 1e-5


def tiny_config(**kw):
    base = dict(vocab_size=101, context_length=24, emb_dim=96, n_heads=3, n_layers=2, drop_rate=0.1, qkv_bias=True)
    base.update(kw)
    return GPTConfig(**base)


def trained_like_model(cfg, quantization="none", seed=0):
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():                                        # LayerNorms off their 1/0 start, like a trained model
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return quantize(model, quantization) if quantization != "none" else model


def fused_calls(monkeypatch):
    calls = []
    real = ops.decode_block
    monkeypatch.setattr(ops, "decode_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("quantization", ["none", "bf16", "int8", "w8a8", "int4"])
@pytest.mark.parametrize("batch", [1, 5])
def test_model_step_is_bitwise_the_op_by_op_path(quantization, batch, monkeypatch):
    """Inside the model the fused block gives the very bits of the extension ops one by one: logits and caches."""
    model = trained_like_model(tiny_config(backend="extension"), quantization)
    idx = torch.randint(0, 101, (batch, 6), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(ops, "fuses_decode_block", lambda *a, **k: False)
        calls = fused_calls(monkeypatch)
        with torch.inference_mode():
            cache = model.new_kv_cache(batch, fused="blocks")   # (True: one call for the whole model)
            model(idx, cache=cache, start_pos=0)
            logits = [decode_step(model, idx[:, i:i + 1], cache, 6 + i) for i in range(4)]
        assert len(calls) == (4 * model.cfg.n_layers if fused else 0)
        results.append((torch.cat(logits), [t for layer in cache.layers for t in (layer.k, layer.v)]))
    (l1, c1), (l2, c2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a[:, :, :10], b[:, :, :10]) for a, b in zip(c1, c2))


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_generation_uses_it_and_agrees(quantization, monkeypatch):
    model = trained_like_model(tiny_config(backend="extension"), quantization, seed=1)
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    calls = fused_calls(monkeypatch)
    fused = generate(model, prompt, max_new_tokens=12, fused_decoding="blocks")   # (True: the whole model)
    assert len(calls) == 11 * model.cfg.n_layers                 # every step after the prefill
    ref = generate(model.set_backend("reference"), prompt, max_new_tokens=12)   # op by op, the textbook ops
    assert torch.equal(fused, ref)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_backends_without_it_go_op_by_op(backend, monkeypatch):
    model = trained_like_model(tiny_config(backend=backend))
    calls = fused_calls(monkeypatch)
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 7) and calls == []


def test_not_in_training_nor_with_autograd(monkeypatch):
    model = trained_like_model(tiny_config(backend="extension"))
    calls = fused_calls(monkeypatch)
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), cache=cache, start_pos=0)
    logits = model(torch.tensor([[3]]), cache=cache, start_pos=2)    # grad enabled, parameters require grad
    assert logits.requires_grad and calls == []
    weights = decode_weights(model.trf_blocks[0])
    assert weights is None
    with torch.no_grad():
        weights = decode_weights(model.trf_blocks[0])
    with pytest.raises(RuntimeError, match="inference"):
        ops.decode_block(torch.randn(1, 1, 96, requires_grad=True), weights, cache.layers[0].k, cache.layers[0].v, 3,
                         backend="extension")


def test_auto_follows_its_linear_choice():
    model = trained_like_model(tiny_config(backend="auto"), "int8")
    with torch.no_grad():
        weights = decode_weights(model.trf_blocks[0])
    x, k = torch.randn(1, 1, 96), model.new_kv_cache(1).layers[0].k
    picked = ops.auto.choose("linear_int8", "cpu", "float32").backend
    assert ops.fuses_decode_block(x, weights, k, backend="auto") == (picked == "extension")
    assert not ops.fuses_decode_block(x.double(), weights, k, backend="auto")


@pytest.mark.slow
def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    model = trained_like_model(tiny_config(backend="extension"), "int8")
    idx = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(5))
    outs = []
    for compile in (False, True):
        with torch.inference_mode():
            cache = model.new_kv_cache(2)
            model(idx, cache=cache, start_pos=0)
            outs.append(torch.cat([decode_step(model, idx[:, :1], cache, 4 + i, compile=compile) for i in range(4)]))
    assert torch.equal(outs[0], outs[1])
    torch._dynamo.reset()


def kernel_args(weights, x, k, v, p):
    return decode_block_kernel_args(x, weights, k, v, p)


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_opcheck(kind):
    weights = make_block(kind, 32, 128, stacked=kind == "int8", seed=2)
    args = kernel_args(weights, rand(2, 1, 32, seed=1), rand(2, 2, 6, 16, seed=2), rand(2, 2, 6, 16, seed=3), 3)
    set_poison_outputs(False)                                    # opcheck compares runs: no NaN fill in between
    torch.library.opcheck(torch.ops.gptfast.decode_block.default, args)


def test_the_kernel_called_directly_refuses_what_its_loops_cannot_take():
    """The interface's checks name each argument (the op's bad_inputs, test_op_contract); the kernel op itself,
    called directly, still refuses what would read out of bounds, with one line saying what."""
    W = make_block("int8", 32, 128, stacked=True, seed=3)
    x, k, v = rand(2, 1, 32, seed=1), rand(2, 2, 6, 16, seed=2), rand(2, 2, 6, 16, seed=3)
    kernel = torch.ops.gptfast.decode_block
    cases = [
        (dict(x=x.double()), "x must be a contiguous float32"),
        (dict(x=rand(17, 1, 32, seed=1), k=rand(17, 2, 6, 16, seed=2), v=rand(17, 2, 6, 16, seed=2)), "1 <= B <= 16"),
        (dict(k=rand(2, 3, 6, 16, seed=2)), "k_cache and v_cache must be"),
        (dict(k=k.transpose(2, 3)), "k_cache and v_cache must be contiguous"),
        (dict(p=6), r"start_pos must be in \[0, 6\)"),
        (dict(W=W._replace(qkv=(W.qkv[0]._replace(scales=None),))), "q weight is int8 and needs scales"),
        (dict(W=W._replace(fc=W.fc._replace(weight=W.fc.weight[:, :16].contiguous()))), r"fc weight must be"),
        (dict(W=W._replace(proj=W.proj._replace(bias=torch.zeros(5)))), "proj bias must be a contiguous float32"),
        (dict(W=W._replace(ln2_weight=torch.ones(31))), "norms must be"),
    ]
    for change, message in cases:
        a = dict(W=W, x=x, k=k, v=v, p=2)
        a.update(change)
        with pytest.raises(RuntimeError, match=message):
            kernel(*kernel_args(a["W"], a["x"], a["k"], a["v"], a["p"]))


def test_gpt2_shapes_bitwise_and_batch_rows_independent():
    """GPT-2's own widths (C 768, 12 heads): a batch of 8 gives each sequence the bits it gets alone."""
    cfg = tiny_config(backend="extension", emb_dim=768, n_heads=12, n_layers=1, vocab_size=64, context_length=16)
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

"""The op interface: `reference` and `torch` backends against each other and float64 math."""
import math

import pytest
import torch

from conftest import rel_error
from gptfast import ops

BACKENDS = ["reference", "torch"]


def attention_inputs(B, H, T, D, dtype=torch.float32, requires_grad=False, noncontiguous=False):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    if noncontiguous:  # (B, T, H, D) storage viewed as (B, H, T, D), as the model produces
        qkv = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3)]
    else:
        qkv = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]
    return [t.to(dtype).requires_grad_(requires_grad) for t in qkv]


def run_with_grads(fn, inputs, seed=0):
    """Output and input gradients for a fresh random upstream gradient."""
    out = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)  # same values per dtype
    grads = torch.autograd.grad(out, inputs, dout)
    return out, grads


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 3, 7, 64), (1, 2, 129, 80), (1, 1, 1000, 32),
                                     (2, 2, 33, 128)])
@pytest.mark.slow
def test_attention_float32_against_float64_reference(backend, B, H, T, D):
    q, k, v = attention_inputs(B, H, T, D, torch.float64, requires_grad=True)
    ref, ref_grads = run_with_grads(lambda *a: ops.causal_attention(*a, backend="reference"), [q, k, v])
    q32, k32, v32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, grads = run_with_grads(lambda *a: ops.causal_attention(*a, backend=backend), [q32, k32, v32])
    assert out.dtype == torch.float32 and out.shape == (B, H, T, D)
    assert rel_error(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_noncontiguous_inputs(backend):
    q, k, v = attention_inputs(2, 4, 37, 16, noncontiguous=True)
    assert not q.is_contiguous()
    out = ops.causal_attention(q, k, v, backend=backend)
    ref = ops.causal_attention(*(t.contiguous().double() for t in (q, k, v)), backend="reference")
    assert rel_error(out, ref) < 1e-5


def test_reference_attention_is_the_textbook_formula():
    q, k, v = attention_inputs(1, 1, 5, 8, torch.float64)
    out = ops.causal_attention(q, k, v, backend="reference")[0, 0]
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    for t in range(5):                                   # row by row, with explicit loops
        scores = torch.stack([q[t] @ k[s] / math.sqrt(8) for s in range(t + 1)])
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        expected = sum(w[s] * v[s] for s in range(t + 1))
        assert torch.allclose(out[t], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_is_causal(backend):
    q, k, v = attention_inputs(1, 2, 12, 16)
    out = ops.causal_attention(q, k, v, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 5.0                                   # change the future only
    v2[:, :, 6:] -= 3.0
    out2 = ops.causal_attention(q, k2, v2, backend=backend)
    assert torch.equal(out[:, :, :6], out2[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], out2[:, :, 6:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_custom_scale(backend):
    q, k, v = attention_inputs(1, 2, 9, 16, torch.float64)
    out = ops.causal_attention(q, k, v, scale=0.3, backend=backend)
    ref = ops.causal_attention(q * (0.3 * 4.0), k, v, backend="reference")   # 1/sqrt(16) = 0.25
    assert rel_error(out, ref) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_is_seeded_and_unbiased(backend):
    q, k, v = attention_inputs(2, 2, 64, 16, torch.float64)
    torch.manual_seed(0)
    a = ops.causal_attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(0)
    b = ops.causal_attention(q, k, v, dropout_p=0.5, backend=backend)
    plain = ops.causal_attention(q, k, v, backend=backend)
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)
    # kept weights are scaled by 1/(1-p): on average the output is unchanged
    torch.manual_seed(1)
    mean = torch.stack([ops.causal_attention(q, k, v, dropout_p=0.5, backend=backend)
                        for _ in range(200)]).mean(0)
    assert rel_error(mean, plain) < 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gradcheck_float64(backend):
    q, k, v = attention_inputs(1, 2, 5, 8, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.causal_attention(*a, backend=backend), (q, k, v))


# ----------------------------------------------------------------------------- layer norm
def layer_norm_inputs(shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5  # non-zero mean, large var
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    b = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 1023), (2, 1600), (4, 7, 1)])
@pytest.mark.slow
def test_layer_norm_float32_against_float64_reference(backend, shape):
    x, w, b = [t.requires_grad_() for t in layer_norm_inputs(shape, torch.float64)]
    ref, ref_grads = run_with_grads(lambda *a: ops.layer_norm(*a, backend="reference"), [x, w, b])
    x32, w32, b32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    out, grads = run_with_grads(lambda *a: ops.layer_norm(*a, backend=backend), [x32, w32, b32])
    assert rel_error(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < 1e-5 or shape[-1] == 1   # C=1: dx is exactly 0 in both


def test_reference_layer_norm_statistics():
    x, _, _ = layer_norm_inputs((6, 1023), torch.float64)
    y = ops.layer_norm(x, torch.ones(1023, dtype=torch.float64), torch.zeros(1023, dtype=torch.float64),
                       backend="reference")
    assert torch.allclose(y.mean(-1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_noncontiguous_and_gradcheck(backend):
    x, w, b = layer_norm_inputs((16, 24), torch.float64)
    xt = x.t()                                            # (24, 16) non-contiguous rows
    w, b = w[:16], b[:16]
    out = ops.layer_norm(xt, w, b, backend=backend)
    assert rel_error(out, ops.layer_norm(xt.contiguous(), w, b, backend="reference")) < 1e-12
    args = [t[:3, :10].clone().requires_grad_() for t in (xt,)] + [w[:10].clone().requires_grad_(),
                                                                  b[:10].clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a, backend=backend), args)


# ----------------------------------------------------------------------------- gelu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_against_float64_and_gradcheck(backend):
    x64 = torch.randn(8, 1023, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    x64.requires_grad_()
    ref, (rg,) = run_with_grads(lambda a: ops.gelu(a, backend="reference"), [x64])
    x32 = x64.detach().float().requires_grad_()
    out, (g,) = run_with_grads(lambda a: ops.gelu(a, backend=backend), [x32])
    assert rel_error(out, ref) < 1e-5 and rel_error(g, rg) < 1e-5
    small = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.gelu(a, backend=backend), (small,))


def test_reference_gelu_values():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    y = ops.gelu(x, backend="reference")
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))   # the tanh form approximates the erf form
    assert y[2] == 0 and torch.allclose(y, exact, atol=2e-3)


# ----------------------------------------------------------------------------- interface
def test_backend_selection_and_errors(monkeypatch):
    status = ops.available_backends()
    assert status["reference"].startswith("available") and status["torch"].startswith("available")
    with pytest.raises(ops.BackendError, match=r"unknown op backend 'cuda-magic'; known backends: reference, torch"):
        ops.resolve_backend_name("cuda-magic")
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    assert ops.resolve_backend_name(None) == "reference"
    monkeypatch.delenv("GPTFAST_BACKEND")
    assert ops.resolve_backend_name(None) == ops.DEFAULT_BACKEND


def test_unavailable_backend_says_why():
    ops.register_backend("broken", "gptfast.ops.does_not_exist", "a backend whose module is missing")
    try:
        assert ops.available_backends()["broken"].startswith("unavailable: ModuleNotFoundError")
        with pytest.raises(ops.BackendError, match="'broken' is unavailable here"):
            ops.resolve_backend_name("broken")
    finally:
        from gptfast.ops import registry
        registry._BACKENDS.pop("broken")


def test_bad_inputs_name_the_argument():
    q, k, v = attention_inputs(1, 2, 4, 8)
    with pytest.raises(ValueError, match="q must have rank 4"):
        ops.causal_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has torch.float32"):
        ops.causal_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="v must have k's shape"):
        ops.causal_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        ops.causal_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.causal_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        ops.causal_attention(q.long(), k, v)
    x, w, b = layer_norm_inputs((2, 8))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(x, w[:4], b)
    with pytest.raises(TypeError, match="bias has dtype"):
        ops.layer_norm(x, w, b.double())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.gelu(torch.arange(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 9), (3, 70), (65, 130)])
def test_attention_with_fewer_queries_than_keys(backend, Tq, Tk):
    # the queries are the last Tq positions: same as full causal attention over Tk, last Tq rows
    q = attention_inputs(2, 3, Tk, 16, torch.float64)[0][:, :, Tk - Tq:]
    _, k, v = attention_inputs(2, 3, Tk, 16, torch.float64)
    q_full = torch.cat([torch.zeros_like(k[:, :, :Tk - Tq]), q], dim=2)
    expected = ops.causal_attention(q_full, k, v, backend="reference")[:, :, Tk - Tq:]
    assert rel_error(ops.causal_attention(q, k, v, backend=backend), expected) < 1e-12
    if Tq < Tk:
        with pytest.raises(ValueError, match="fewer than q's"):
            ops.causal_attention(k, q, q, backend=backend)             # keys must cover the queries

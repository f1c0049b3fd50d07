"""Triton kernels (LayerNorm, GELU) against the float64 reference twins.

Without a CUDA GPU they run in Triton's interpreter on CPU tensors (float32 and float16 only).
"""
import pytest
import torch

triton_ops = pytest.importorskip("gptfast.ops.triton", reason="Triton is not installed",
                                 exc_type=ImportError)

from conftest import rel_error  # noqa: E402
from gptfast.ops import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]      # the interpreter computes bf16 wrongly


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(DEVICE)


def errors(fn, ref_fn, inputs64, dtype, seed=1):
    """Relative errors of fn at `dtype` vs ref_fn in float64: [output, *grads]."""
    ref_in = [t.clone().requires_grad_() for t in inputs64]
    ref = ref_fn(*ref_in)
    dout = rand(*ref.shape, seed=seed)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ins = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    out = fn(*ins)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, ins, dout.to(dtype))
    return [rel_error(out, ref)] + [rel_error(g, rg) for g, rg in zip(grads, ref_grads)]


def check(fn, torch_fn, ref_fn, inputs64, dtype):
    errs = errors(fn, ref_fn, inputs64, dtype)
    if dtype == torch.float32:
        assert max(errs) < 1e-5, errs
    else:  # half precision: absolute bar, and no worse than 2x PyTorch's own at this precision
        baseline = errors(torch_fn, ref_fn, inputs64, dtype)
        assert max(errs) < 1e-2, errs
        assert all(e <= 2 * b + 1e-6 for e, b in zip(errs, baseline)), (errs, baseline)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 1023), (9, 1600), (70, 64)])
def test_layer_norm_matches_reference(dtype, shape):
    C = shape[-1]
    x, w, b = rand(*shape, seed=1, scale=2.0, shift=3.0), rand(C, seed=2), rand(C, seed=3)
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b)  # noqa: E731
    check(triton_ops.layer_norm, torch_ln, reference.layer_norm, [x, w, b], dtype)


def test_layer_norm_noncontiguous_stats_and_deterministic_backward():
    x = rand(40, 24, seed=7).t().float()              # (24, 40), non-contiguous
    w, b = rand(40, seed=8).float(), rand(40, seed=9).float()
    y, mean, rstd = triton_ops.layer_norm_fwd(x, w, b, 1e-5)
    assert rel_error(y, reference.layer_norm(x.double(), w.double(), b.double())) < 1e-5
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (24,)
    dy = rand(24, 40, seed=10).float()
    first = triton_ops.layer_norm_bwd(dy, x, w, mean, rstd)
    second = triton_ops.layer_norm_bwd(dy, x, w, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1023), (2, 40000)])
def test_gelu_matches_reference(dtype, shape):
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check(triton_ops.gelu, torch_gelu, reference.gelu, [rand(*shape, seed=13, scale=3.0)], dtype)


def test_opcheck_every_op():
    x, w, b = rand(4, 5, 32, seed=20).float(), rand(32, seed=21).float(), rand(32, seed=22).float()
    y, mean, rstd = triton_ops.layer_norm_fwd(x, w, b, 1e-5)
    g = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(triton_ops.layer_norm_fwd, (g(x), g(w), g(b), 1e-5))
    torch.library.opcheck(triton_ops.layer_norm_bwd, (rand(4, 5, 32, seed=23).float(), x, w, mean, rstd))
    torch.library.opcheck(triton_ops.gelu_fwd, (g(x),))
    torch.library.opcheck(triton_ops.gelu_bwd, (y, x))


def test_bad_inputs_name_the_argument():
    x = rand(2, 8).float()
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        triton_ops.layer_norm(x, rand(4).float(), rand(8).float())
    with pytest.raises(TypeError, match="bias must match x's dtype"):
        triton_ops.layer_norm(x, rand(8).float(), rand(8).half())
    with pytest.raises(TypeError, match="float64"):
        triton_ops.gelu(rand(3))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        triton_ops.gelu(torch.arange(3, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 wrongly")
def test_bfloat16_on_gpu():
    x, w, b = rand(64, 768, seed=30, shift=1.0), rand(768, seed=31), rand(768, seed=32)
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (768,), w, b)  # noqa: E731
    check(triton_ops.layer_norm, torch_ln, reference.layer_norm, [x, w, b], torch.bfloat16)
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check(triton_ops.gelu, torch_gelu, reference.gelu, [rand(64, 3072, seed=33)], torch.bfloat16)

"""ops.layer_norm on every backend: the textbook's statistics, the kernels' own paths (statistics outputs,
streaming stores past 16 MB, the deterministic backward and its partial sums), Triton and CUDA. The cases every op
shares (shapes, strides, bad input, gradcheck, opcheck, compile) are tests/test_op_contract.py's."""
import threading

import pytest
import torch

from conftest import (TOL, check_precision, crand, needs_gpu, rand, rel_error, run_with_grads, trand)
from conftest import compare_to_reference as compare
from gptfast import ops
from gptfast.ops import reference

KERNELS = ops.get_backend("extension").KERNELS  # our C++/CUDA kernel ops, their fakes and autograd registered
import gptfast.ops.triton  # noqa: E402,F401   (registers torch.ops.gptfast_triton)
TRITON_KERNELS = torch.ops.gptfast_triton
BACKENDS = ["reference", "torch"]             # the interface tests below: PyTorch-only backends
CPU_DTYPES = [torch.float32, torch.float16]   # Triton's interpreter computes bf16 wrongly
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")   # kernel outputs start as NaN


# ----------------------------------------------------------------------------- the interface: reference and torch


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
def test_interface_layer_norm_float32_against_float64_reference(backend, shape):
    x, w, b = [t.requires_grad_() for t in layer_norm_inputs(shape, torch.float64)]
    ref, ref_grads = run_with_grads(lambda *a: ops.layer_norm(*a, backend="reference"), [x, w, b])
    x32, w32, b32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    out, grads = run_with_grads(lambda *a: ops.layer_norm(*a, backend=backend), [x32, w32, b32])
    assert rel_error(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < 1e-5 or shape[-1] == 1   # C=1: dx is exactly 0 in both


def test_interface_reference_layer_norm_statistics():
    x, _, _ = layer_norm_inputs((6, 1023), torch.float64)
    y = ops.layer_norm(x, torch.ones(1023, dtype=torch.float64), torch.zeros(1023, dtype=torch.float64),
                       backend="reference")
    assert torch.allclose(y.mean(-1), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interface_layer_norm_noncontiguous_and_gradcheck(backend):
    x, w, b = layer_norm_inputs((16, 24), torch.float64)
    xt = x.t()                                            # (24, 16) non-contiguous rows
    w, b = w[:16], b[:16]
    out = ops.layer_norm(xt, w, b, backend=backend)
    assert rel_error(out, ops.layer_norm(xt.contiguous(), w, b, backend="reference")) < 1e-12
    args = [t[:3, :10].clone().requires_grad_() for t in (xt,)] + [w[:10].clone().requires_grad_(),
                                                                  b[:10].clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a, backend=backend), args)


# ----------------------------------------------------------------------------- the C++ kernels (extension, CPU)


# ----------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 768), (4, 3, 1023), (9, 1600), (2, 5), (70, 64)])
@pytest.mark.slow
def test_layer_norm_matches_reference(dtype, shape):
    C = shape[-1]
    x, w, b = rand(*shape, seed=1, scale=2.0, shift=3.0), rand(C, seed=2), rand(C, seed=3)
    compare(lambda *a: ops.layer_norm(*a, backend="extension"), reference.layer_norm, [x, w, b],
            dtype, TOL[dtype])


@pytest.mark.parametrize("shape", [(6000, 768), (4200, 1023)])
@pytest.mark.slow
def test_layer_norm_outputs_past_16_mb(shape):
    """float32 outputs of 16 MB and more take streaming (non-temporal) stores when every row starts
    on a cache line (768 columns); 1023 columns cannot and store normally. Both against float64."""
    C = shape[-1]
    x, w, b = rand(*shape, seed=4, scale=2.0, shift=3.0), rand(C, seed=5), rand(C, seed=6)
    assert shape[0] * C * 4 >= 16 << 20
    compare(lambda *a: ops.layer_norm(*a, backend="extension"), reference.layer_norm, [x, w, b],
            torch.float32, TOL[torch.float32])


def test_layer_norm_large_offset_rows():
    # |mean| >> std: a naive E[x^2] - E[x]^2 loses every digit in float32
    x, w, b = rand(8, 768, seed=4, shift=1000.0), rand(768, seed=5), rand(768, seed=6)
    out = ops.layer_norm(x.float(), w.float(), b.float(), backend="extension")
    assert rel_error(out, reference.layer_norm(x, w, b)) < 1e-4


def test_layer_norm_noncontiguous_and_stats():
    x = rand(40, 24, seed=7).t()                      # (24, 40), non-contiguous
    w, b = rand(40, seed=8), rand(40, seed=9)
    y, mean, rstd = KERNELS.layer_norm_fwd(x, w, b, 1e-5)
    assert rel_error(y, reference.layer_norm(x, w, b)) < 1e-12
    assert rel_error(mean, x.mean(-1)) < 1e-12
    assert rel_error(rstd, 1 / torch.sqrt(x.var(-1, unbiased=False) + 1e-5)) < 1e-12
    _, mean32, rstd32 = KERNELS.layer_norm_fwd(x.float(), w.float(), b.float(), 1e-5)
    assert mean32.dtype == rstd32.dtype == torch.float32


def test_layer_norm_backward_is_deterministic():
    x, w = rand(1000, 768, seed=10), rand(768, seed=11)
    dy = rand(1000, 768, seed=12)
    y, mean, rstd = KERNELS.layer_norm_fwd(x.float(), w.float(), w.float(), 1e-5)
    first = KERNELS.layer_norm_bwd(dy.float(), x.float(), w.float(), mean, rstd)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = KERNELS.layer_norm_bwd(dy.float(), x.float(), w.float(), mean, rstd)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def layer_norm_grads(x, w, dy, dtype):
    """(dx, dweight, dbias) from our backward op at `dtype`, and from float64 autograd."""
    y, mean, rstd = KERNELS.layer_norm_fwd(x.to(dtype), w.to(dtype), w.to(dtype), 1e-5)
    ours = KERNELS.layer_norm_bwd(dy.to(dtype), x.to(dtype), w.to(dtype), mean, rstd)
    ins = [t.clone().requires_grad_() for t in (x, w, w)]
    ref = torch.autograd.grad(reference.layer_norm(*ins), ins, dy)
    return ours, ref


def test_layer_norm_backward_partial_sums_reused_safely():
    """The backward's dweight/dbias partial sums live in a buffer the calling thread keeps from call to
    call: a wide call, then narrower ones with fewer rows (stale sums left in the buffer), other dtypes,
    and calls from two threads at once must each match float64; x with no rows gives zero gradients."""
    def check(N, C, dtype, seed):
        x, w, dy = rand(N, C, seed=seed, scale=2.0, shift=1.0), rand(C, seed=seed + 1), rand(N, C, seed=seed + 2)
        ours, ref = layer_norm_grads(x, w, dy, dtype)
        errors = [rel_error(a, b) for a, b in zip(ours, ref)]
        assert max(errors) < TOL[dtype], (N, C, dtype, errors)

    for N, C, dtype in [(3000, 1600, torch.float32), (40, 768, torch.float32), (5, 64, torch.float64),
                        (1, 1023, torch.float32), (700, 768, torch.float64), (33, 1600, torch.float32)]:
        check(N, C, dtype, seed=N)
    errors = []

    def worker(seed):
        try:
            for i in range(4):
                check(200 + 37 * i, (768, 1023)[(seed + i) % 2], torch.float32, seed=seed + i)
        except AssertionError as err:        # collected: an assert in a thread would go unseen
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    x = torch.randn(0, 768)
    _, mean, rstd = KERNELS.layer_norm_fwd(x, torch.ones(768), torch.zeros(768), 1e-5)
    dx, dw, db = KERNELS.layer_norm_bwd(x, x, torch.ones(768), mean, rstd)
    assert dx.shape == (0, 768) and torch.equal(dw, torch.zeros(768)) and torch.equal(db, torch.zeros(768))


# ----------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 1023), (9, 1600), (70, 64)])
@pytest.mark.slow
def test_triton_layer_norm_matches_reference(dtype, shape):
    C = shape[-1]
    x, w, b = trand(*shape, seed=1, scale=2.0, shift=3.0), trand(C, seed=2), trand(C, seed=3)
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b)  # noqa: E731
    check_precision(lambda *a: ops.layer_norm(*a, backend="triton"), torch_ln, reference.layer_norm, [x, w, b], dtype)


def test_triton_layer_norm_noncontiguous_stats_and_deterministic_backward():
    x = trand(40, 24, seed=7).t().float()              # (24, 40), non-contiguous
    w, b = trand(40, seed=8).float(), trand(40, seed=9).float()
    y, mean, rstd = TRITON_KERNELS.layer_norm_fwd(x, w, b, 1e-5)
    assert rel_error(y, reference.layer_norm(x.double(), w.double(), b.double())) < 1e-5
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (24,)
    dy = trand(24, 40, seed=10).float()
    first = TRITON_KERNELS.layer_norm_bwd(dy, x, w, mean, rstd)
    second = TRITON_KERNELS.layer_norm_bwd(dy, x, w, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


# ----------------------------------------------------------------------------- CUDA (GPU only)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8 * 1024, 768), (3, 5, 1023), (9, 1600), (1, 768)])
@needs_gpu
def test_cuda_layer_norm(dtype, shape):
    C = shape[-1]
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b)  # noqa: E731
    check_precision(lambda *a: ops.layer_norm(*a, backend="extension"), torch_ln, reference.layer_norm,
                    [crand(*shape, seed=1, scale=2.0, shift=1.0), crand(C, seed=2), crand(C, seed=3)], dtype)


def test_triton_layer_norm_says_it_takes_no_float64():
    with pytest.raises(TypeError, match="the Triton LayerNorm supports"):
        ops.layer_norm(rand(2, 8), rand(8), rand(8), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 wrongly")
def test_triton_bfloat16_on_gpu():
    x, w, b = trand(64, 768, seed=30, shift=1.0), trand(768, seed=31), trand(768, seed=32)
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (768,), w, b)  # noqa: E731
    check_precision(lambda *a: ops.layer_norm(*a, backend="triton"), torch_ln, reference.layer_norm, [x, w, b],
                    torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitwise repeatability is a GPU property to check")
def test_triton_backward_is_bitwise_repeatable_on_gpu():
    x, w = trand(4096, 768, seed=71).to(torch.bfloat16), trand(768, seed=72).to(torch.bfloat16)
    _, mean, rstd = TRITON_KERNELS.layer_norm_fwd(x, w, w, 1e-5)
    dy = torch.randn_like(x)
    a, b = TRITON_KERNELS.layer_norm_bwd(dy, x, w, mean, rstd), TRITON_KERNELS.layer_norm_bwd(dy, x, w, mean, rstd)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("call,message", [
    (lambda: KERNELS.layer_norm_fwd(rand(2, 8), rand(4), rand(8), 1e-5), r"weight must have shape \(8,\)"),
    (lambda: KERNELS.layer_norm_fwd(rand(2, 8), rand(8), rand(8), -1.0), "eps must be positive"),
    (lambda: KERNELS.layer_norm_bwd(rand(2, 8), rand(2, 8), rand(8), rand(2, dtype=torch.float32), rand(2)),
     "mean must have dtype Double"),
    (lambda: KERNELS.layer_norm_fwd(rand(2, 8, dtype=torch.bfloat16), rand(8, dtype=torch.float32), rand(8), 1e-5),
     "weight has dtype Float but x has BFloat16"),
])
def test_the_cpu_kernel_called_directly_names_a_bad_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_bench_work_by_hand():
    """bench_ops' count of one call: x read and y written, the backward counted as twice that."""
    bench = ops.OPS["layer_norm"].bench("layer_norm", (8, 768))
    assert bench.work(torch.float32, "fwd") == 2 * 8 * 768 * 4 and bench.work(torch.bfloat16, "fwd+bwd") == 4 * 8 * 768 * 2

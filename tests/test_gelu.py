"""ops.gelu on every backend: the tanh form's values, the kernels' tails and strides, Triton and CUDA. The cases
every op shares are tests/test_op_contract.py's."""
import math

import pytest
import torch

from conftest import (TOL, check_precision, crand, needs_gpu, rand, rel_error, run_with_grads, trand)
from conftest import compare_to_reference as compare
from gptfast import ops
from gptfast.ops import reference

KERNELS = ops.get_backend("extension").KERNELS  # our C++/CUDA kernel ops, their fakes and autograd registered
import gptfast.ops.triton  # noqa: E402,F401   (registers torch.ops.gptfast_triton)
BACKENDS = ["reference", "torch"]             # the interface tests below: PyTorch-only backends
CPU_DTYPES = [torch.float32, torch.float16]   # Triton's interpreter computes bf16 wrongly
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")   # kernel outputs start as NaN


# ----------------------------------------------------------------------------- the interface: reference and torch


# ----------------------------------------------------------------------------- gelu
@pytest.mark.parametrize("backend", BACKENDS)
def test_interface_gelu_against_float64_and_gradcheck(backend):
    x64 = torch.randn(8, 1023, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    x64.requires_grad_()
    ref, (rg,) = run_with_grads(lambda a: ops.gelu(a, backend="reference"), [x64])
    x32 = x64.detach().float().requires_grad_()
    out, (g,) = run_with_grads(lambda a: ops.gelu(a, backend=backend), [x32])
    assert rel_error(out, ref) < 1e-5 and rel_error(g, rg) < 1e-5
    small = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.gelu(a, backend=backend), (small,))


def test_interface_reference_gelu_values():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    y = ops.gelu(x, backend="reference")
    exact = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))   # the tanh form approximates the erf form
    assert y[2] == 0 and torch.allclose(y, exact, atol=2e-3)


# ----------------------------------------------------------------------------- the C++ kernels (extension, CPU)


# ----------------------------------------------------------------------------- gelu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1023), (2, 40000)])   # tails and parallel chunks
@pytest.mark.slow
def test_gelu_matches_reference(dtype, shape):
    compare(lambda a: ops.gelu(a, backend="extension"), reference.gelu, [rand(*shape, seed=13, scale=3.0)],
            dtype, TOL[dtype])


def test_gelu_noncontiguous():
    x = rand(30, 50, seed=14).t()
    assert rel_error(KERNELS.gelu_fwd(x), reference.gelu(x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [7, 33, 132, 1023])
def test_gelu_element_does_not_depend_on_where_it_sits(dtype, C):
    """Each element's forward and backward bits are the same alone, in a batch of rows, or shifted by any
    offset: the partial last vector goes through the vector code (padded), not a scalar loop whose exp
    rounds differently (it once did: ~1 element in 660 of randn(2, 132) differed from its row alone)."""
    t = rand(3, C, seed=C, scale=3.0).to(dtype)
    dy = rand(3, C, seed=C + 1).to(dtype)
    y, dx = KERNELS.gelu_fwd(t), KERNELS.gelu_bwd(dy, t)
    for r in range(3):
        assert torch.equal(KERNELS.gelu_fwd(t[r].clone()), y[r])
        assert torch.equal(KERNELS.gelu_bwd(dy[r].clone(), t[r].clone()), dx[r])
    flat, dflat = t.flatten(), dy.flatten()
    for shift in range(1, 17):
        assert torch.equal(KERNELS.gelu_fwd(flat[shift:].clone()), y.flatten()[shift:])
        assert torch.equal(KERNELS.gelu_bwd(dflat[shift:].clone(), flat[shift:].clone()), dx.flatten()[shift:])


# ----------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1023), (2, 40000)])
@pytest.mark.slow
def test_triton_gelu_matches_reference(dtype, shape):
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check_precision(lambda a: ops.gelu(a, backend="triton"), torch_gelu, reference.gelu, [trand(*shape, seed=13, scale=3.0)], dtype)


# ----------------------------------------------------------------------------- CUDA (GPU only)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8 * 1024, 3072), (7,), (3, 1001)])
@needs_gpu
def test_cuda_gelu(dtype, shape):
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check_precision(lambda a: ops.gelu(a, backend="extension"), torch_gelu, reference.gelu,
                    [crand(*shape, seed=4, scale=3.0)], dtype)


def test_triton_gelu_says_it_takes_no_float64():
    with pytest.raises(TypeError, match="the Triton GELU supports float32, float16 and bfloat16, got float64"):
        ops.gelu(rand(3), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 wrongly")
def test_triton_bfloat16_on_gpu():
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check_precision(lambda a: ops.gelu(a, backend="triton"), torch_gelu, reference.gelu, [trand(64, 3072, seed=33)],
                    torch.bfloat16)


@pytest.mark.parametrize("call,message", [
    (lambda: KERNELS.gelu_fwd(torch.arange(4)), "x must be a floating-point tensor"),
    (lambda: KERNELS.gelu_bwd(rand(3), rand(4)), "dy must have x's shape"),
    (lambda: KERNELS.gelu_fwd(rand(4).to(torch.int32)), "x must be a floating-point tensor"),
])
def test_the_cpu_kernel_called_directly_names_a_bad_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_bench_work_by_hand():
    bench = ops.OPS["gelu"].bench("gelu", (8, 768))
    assert bench.work(torch.float32, "fwd+bwd") == 2 * 2 * 8 * 768 * 4

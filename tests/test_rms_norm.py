"""ops.rms_norm beyond the contract every op shares (tests/test_op_contract.py: shapes, strides, bad input,
gradcheck, opcheck, rows alone = in a batch, compile): the kernels' own outputs and paths - the saved rstd, the
backward's fixed-order dweight whatever the thread count, streaming stores past 16 MB - and the norm transformers'
Llama/Qwen3 models use."""
import pytest
import torch

from conftest import rel_error
from gptfast import ops
from gptfast.ops.rms_norm import reference

pytestmark = pytest.mark.usefixtures("poisoned_outputs")   # kernel outputs start as NaN
KERNELS = ops.get_backend("extension").KERNELS


def inputs(rows, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g, dtype=torch.float64) * 2 + 0.3
    w = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 1
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_kernel_keeps_rstd(dtype):
    x, w = inputs(5, 1023, dtype)
    y, rstd = KERNELS.rms_norm_fwd(x, w, 1e-6)
    want = 1 / torch.sqrt((x.double() ** 2).mean(-1) + 1e-6)
    assert rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(rstd, want) < (1e-12 if dtype == torch.float64 else 1e-6)


def test_dweight_does_not_depend_on_the_thread_count():
    """600 rows: several blocks of the partial sums; 1 and 2 threads give the same bits."""
    x, w = inputs(600, 1024, torch.float32, seed=1)
    dy = torch.randn_like(x)
    _, rstd = KERNELS.rms_norm_fwd(x, w, 1e-6)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(KERNELS.rms_norm_bwd(dy, x, w, rstd))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.autograd.grad(reference(xd, wd), (xd, wd), dy.double())
    assert all(rel_error(got, ref) < 1e-5 for got, ref in zip(outs[0], want))


def test_streaming_stores_past_16_mb():
    x, w = inputs(4200, 1024, torch.float32, seed=2)                # y and dx: 17 MB each
    x.requires_grad_()
    y = ops.rms_norm(x, w, backend="extension")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    xd = x.detach().double().requires_grad_()
    ref = reference(xd, w.double())
    assert rel_error(y, ref) < 1e-6
    assert rel_error(dx, torch.autograd.grad(ref, xd, dy.double())[0]) < 1e-5


def test_what_transformers_llama_and_qwen3_compute():
    transformers = pytest.importorskip("transformers", reason="the comparison with transformers needs its test extra")
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    norm = Qwen3RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(3, 5, 96)
    assert transformers.__version__ and rel_error(ops.rms_norm(x, norm.weight, 1e-6, backend="extension"), norm(x)) < 1e-6

"""ops.cross_entropy: every backend against the float64 reference, gradients included."""
import math

import pytest
import torch

from conftest import check_precision, needs_gpu, randn64, rel_error
from gptfast import ops
from gptfast.compiled import load_extension

BACKENDS = ["reference", "torch", "extension", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def crand(*shape, seed=0, scale=1.0, shift=0.0):
    return randn64(*shape, seed=seed, scale=scale, shift=shift, device="cuda")


def logits_targets(N, V, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        targets[i] = -100
    return logits, targets


def loss_and_grad(backend, logits, targets, dtype):
    x = logits.detach().to(dtype).requires_grad_()
    loss = ops.cross_entropy(x, targets, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad


def test_reference_is_minus_log_softmax():
    logits, targets = logits_targets(6, 11, ignore=(2,))
    loss = ops.cross_entropy(logits, targets, backend="reference")
    rows = [i for i in range(6) if i != 2]
    expected = sum(-torch.log_softmax(logits[i], -1)[targets[i]] for i in rows) / len(rows)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,V", [(3, 50257), (2, 50304), (17, 1000), (1, 7)])
def test_float32_matches_float64_reference(backend, N, V):
    logits, targets = logits_targets(N, V, seed=N + V, ignore=(0,) if N > 2 else ())
    ref_loss, ref_grad = loss_and_grad("reference", logits, targets, torch.float64)
    loss, grad = loss_and_grad(backend, logits, targets, torch.float32)
    assert loss.dtype == torch.float32
    assert rel_error(loss, ref_loss) < 1e-5 and rel_error(grad, ref_grad) < 1e-5
    if N > 2:
        assert torch.all(grad[0] == 0)                      # the ignored row gets no gradient


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_gradcheck_float64(backend):
    logits, targets = logits_targets(4, 9, ignore=(1,))
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ops.cross_entropy(a, targets, backend=backend), (x,))


def test_triton_float16_within_twice_torch_error():
    logits, targets = logits_targets(8, 5000, seed=3)
    ref_loss, ref_grad = loss_and_grad("reference", logits, targets, torch.float64)
    ours = loss_and_grad("triton", logits, targets, torch.float16)
    theirs = loss_and_grad("torch", logits, targets, torch.float16)
    for o, t, r in zip(ours, theirs, (ref_loss, ref_grad)):
        assert rel_error(o, r) < 1e-2 and rel_error(o, r) <= 2 * rel_error(t, r) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_nan_like_torch_with_a_zero_gradient(backend):
    """A batch whose every target is ignored: NaN loss, as F.cross_entropy, but - also as PyTorch - a zero
    gradient, so that a loss scaled by 0 (gradient accumulation over tokens) leaves the weights finite."""
    logits, targets = logits_targets(3, 10, ignore=(0, 1, 2))
    x = logits.float().requires_grad_()
    loss = ops.cross_entropy(x, targets, backend=backend)
    assert math.isnan(loss.item())
    (loss.nan_to_num() * 0.0).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_and_bad_inputs(backend):
    logits, targets = logits_targets(6, 13)
    a = ops.cross_entropy(logits.float().view(2, 3, 13), targets.view(2, 3), backend=backend)
    b = ops.cross_entropy(logits.float(), targets, backend=backend)
    assert rel_error(a, b) < 1e-6
    with pytest.raises(ValueError, match=r"outside \[0, 13\)"):
        ops.cross_entropy(logits.float(), targets + 13, backend=backend)
    with pytest.raises(TypeError, match="targets must be an int64 tensor"):
        ops.cross_entropy(logits.float(), targets.int(), backend=backend)
    with pytest.raises(ValueError, match=r"targets must have shape \(6,\)"):
        ops.cross_entropy(logits.float(), targets[:5], backend=backend)


def test_opcheck_extension_and_triton_ops():
    import gptfast.ops.triton as triton_ops

    load_extension()
    logits, targets = logits_targets(5, 300, ignore=(1,))
    x = logits.float()
    for fwd, bwd in ((torch.ops.gptfast.cross_entropy_fwd.default, torch.ops.gptfast.cross_entropy_bwd.default),
                     (torch.ops.gptfast_triton.cross_entropy_fwd, torch.ops.gptfast_triton.cross_entropy_bwd)):
        torch.library.opcheck(fwd, (x.clone().requires_grad_(), targets, -100, True))
        torch.library.opcheck(fwd, (x, targets, -100, False))
        dl = fwd(x, targets, -100, True)[2]
        torch.library.opcheck(bwd, (dl, torch.rand(5)))


def test_no_gradient_without_compute_grad():
    import gptfast.ops.triton as triton_ops

    x = torch.randn(3, 10, requires_grad=True)
    loss = torch.ops.gptfast_triton.cross_entropy_fwd(x, torch.tensor([1, 2, 3]), -100, False)[0].sum()
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPT-2-vocabulary cross-entropy in all dtypes needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_cross_entropy_gpt2_vocab_on_gpu(dtype):
    g = torch.Generator().manual_seed(80)
    logits = (torch.randn(2048, 50304, generator=g, dtype=torch.float64) * 2).to("cuda")
    targets = torch.randint(0, 50304, (2048,), generator=g).to("cuda")
    targets[::7] = -100
    ce = lambda backend: lambda x: ops.cross_entropy(x, targets, backend=backend)  # noqa: E731
    check_precision(ce("triton"), ce("torch"), ce("reference"), [logits], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@needs_gpu
def test_cuda_cross_entropy_gpt2_vocab(dtype):
    g = torch.Generator().manual_seed(6)
    targets = torch.randint(0, 50304, (1024,), generator=g).cuda()
    targets[::5] = -100
    ce = lambda backend: lambda x: ops.cross_entropy(x, targets, backend=backend)  # noqa: E731
    check_precision(ce("extension"), ce("torch"), ce("reference"), [crand(1024, 50304, seed=7, scale=2.0)], dtype)


def test_bench_work_by_hand():
    bench = ops.OPS["cross_entropy"].bench("cross_entropy", (4, 50257))
    assert bench.work(torch.float32, "fwd") == 4 * 50257 * 4

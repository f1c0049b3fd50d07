"""ops.dropout_add - y = residual + dropout(x), the mask from the shared counter-based RNG - on every
backend against the float64 reference: the same elements dropped everywhere, odd shapes, mixed
precision (a 16-bit branch into a float32 residual), gradients, op checks, bad input."""
import pytest
import torch

from conftest import rel_error
from gptfast import ops
from gptfast.compiled import set_poison_outputs
from gptfast.ops import reference
from gptfast.ops.dropout_rng import dropout_keep_mask

SHARED = ["reference", "extension", "triton"]          # the backends on the counter-based RNG
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 768), (2, 7, 1023), (1, 129, 1600), (3, 1000, 16), (5,), (4, 1, 1)]


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs():
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def textbook(x, residual, p, seed):
    """The mask straight from dropout_rng over the (rows, C) view, then residual + x * keep / (1 - p)."""
    C = x.shape[-1]
    keep = dropout_keep_mask(torch.tensor([seed]), 1, x.numel() // C, C, p)[0].reshape(x.shape)
    return (0 if residual is None else residual) + torch.where(keep, x / (1 - p), torch.zeros_like(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", SHARED)
def test_float32_against_the_float64_reference_and_the_textbook(backend, shape):
    x, r = rand(*shape), rand(*shape, seed=1)
    want = textbook(x, r, 0.25, 77)
    assert rel_error(reference.dropout_add(x, r, 0.25, torch.tensor([77])), want) < 1e-15
    dev = device_for(backend)
    out = ops.dropout_add(x.float().to(dev), r.float().to(dev), 0.25, seed=77, backend=backend).cpu()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_error(out, want) < 1e-6


def test_auto_computes_what_its_chosen_backend_computes():
    x, r = rand(4, 16, 768).float(), rand(4, 16, 768, seed=1).float()
    chosen = ops.auto.choose("dropout_add", "cpu", "float32").backend
    torch.manual_seed(3)
    a = ops.dropout_add(x, r, 0.1, backend="auto")
    torch.manual_seed(3)
    b = ops.dropout_add(x, r, 0.1, backend=chosen)
    assert torch.equal(a, b)
    assert ops.shares_dropout_rng("auto", "cpu", "float32") == all(
        ops.shares_dropout_rng(ops.auto.choose(op, "cpu", "float32").backend) for op in ("dropout_add",
                                                                                        "attention_dropout"))


@pytest.mark.parametrize("backend", SHARED)
def test_every_backend_drops_exactly_the_same_elements(backend):
    x = torch.ones(3, 50, 384)
    out = ops.dropout_add(x.to(device_for(backend)), None, 0.3, seed=2**40 + 5, backend=backend).cpu()
    ref = ops.dropout_add(x.double(), None, 0.3, seed=2**40 + 5, backend="reference")
    assert torch.equal(out != 0, ref != 0)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.01                                  # 57,600 draws: 0.7 +- 0.002 (1 sigma)
    assert not torch.equal(out != 0, ops.dropout_add(x, None, 0.3, seed=6, backend="reference") != 0)


@pytest.mark.parametrize("backend", SHARED)
def test_gradients_regenerate_the_mask(backend):
    dev = device_for(backend)
    x, r = rand(2, 9, 80).float().to(dev).requires_grad_(), rand(2, 9, 80, seed=1).float().to(dev).requires_grad_()
    y = ops.dropout_add(x, r, 0.5, seed=3, backend=backend)
    dy = rand(2, 9, 80, seed=2).float().to(dev)
    dx, dr = torch.autograd.grad(y, (x, r), dy)
    keep = (textbook(torch.ones(2, 9, 80, dtype=torch.float64), None, 0.5, 3) != 0)
    assert rel_error(dx.cpu(), dy.cpu().double() * keep * 2) < 1e-7 and torch.equal(dr.cpu(), dy.cpu())


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_gradcheck_in_float64(backend):
    x, r = rand(2, 3, 5).requires_grad_(), rand(2, 3, 5, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.dropout_add(a, b, 0.4, seed=11, backend=backend), (x, r))
    assert torch.autograd.gradcheck(lambda a: ops.dropout_add(a, None, 0.4, seed=11, backend=backend), (x,))


@pytest.mark.parametrize("backend", SHARED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_branch_into_a_float32_residual(backend, dtype):
    """Under autocast the branch (attention / MLP output) is 16-bit, the residual stream float32: y is float32,
    dx comes back in the branch's dtype; the error is held to 2x PyTorch's own at that precision."""
    if backend == "triton" and dtype == torch.bfloat16 and TRITON_DEVICE == "cpu":
        pass                                                      # the backend widens it (interpreter limitation)
    dev = device_for(backend)
    x64, r64 = rand(4, 33, 768), rand(4, 33, 768, seed=1)
    want = textbook(x64.to(dtype).double(), r64, 0.1, 5)         # the math on the rounded input
    x = x64.to(dtype).to(dev).requires_grad_()
    r = r64.float().to(dev).requires_grad_()
    y = ops.dropout_add(x, r, 0.1, seed=5, backend=backend)
    assert y.dtype == torch.float32
    keep = textbook(torch.ones_like(x64), None, 0.1, 5) != 0
    torch_error = rel_error((r64.float() + torch.where(keep, x64.to(dtype) / 0.9, 0).to(dtype).float()), want)
    assert rel_error(y.detach().cpu(), want) <= max(2 * torch_error, 1e-6)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.dtype == dtype and torch.equal(dx.cpu().float() != 0, keep)


@pytest.mark.parametrize("backend", SHARED)
def test_noncontiguous_inputs(backend):
    dev = device_for(backend)
    x, r = rand(6, 40, 32).transpose(0, 1), rand(40, 6, 32, seed=1)
    assert not x.is_contiguous()
    out = ops.dropout_add(x.float().to(dev), r.float().to(dev), 0.2, seed=9, backend=backend).cpu()
    assert rel_error(out, textbook(x.contiguous(), r, 0.2, 9)) < 1e-6


def test_torch_backend_is_nn_dropout_then_the_add():
    x, r = rand(8, 64).float(), rand(8, 64, seed=1).float()
    torch.manual_seed(0)
    out = ops.dropout_add(x, r, 0.5, seed=1, backend="torch")
    torch.manual_seed(0)
    assert torch.equal(out, r + torch.nn.functional.dropout(x, 0.5))


def test_p_zero_is_the_plain_add_and_eval_mode_never_drops():
    x, r = rand(3, 4).float(), rand(3, 4, seed=1).float()
    assert torch.equal(ops.dropout_add(x, r, 0.0), r + x) and ops.dropout_add(x, None, 0.0) is x


@pytest.mark.parametrize("call,error,message", [
    (lambda: ops.dropout_add(torch.ones(3, 4), torch.ones(3, 5), 0.1), ValueError, "residual must have x's shape"),
    (lambda: ops.dropout_add(torch.ones(3, 4), None, 1.0), ValueError, r"p must be in \[0, 1\)"),
    (lambda: ops.dropout_add(torch.ones(3, 4, dtype=torch.int64), None, 0.1), TypeError, "x must be a floating"),
    (lambda: ops.dropout_add(torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float64), 0.1), TypeError,
     "residual must have x's dtype"),
    (lambda: ops.dropout_add(torch.ones(()), None, 0.1), ValueError, "at least one dimension"),
    (lambda: ops.dropout_add(torch.ones(3, 4), torch.ones(3, 4, device="meta"), 0.1), ValueError, "residual is on"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_opcheck_extension_and_triton_ops():
    x, r, seed = rand(3, 8, 16).float(), rand(3, 8, 16, seed=1).float(), torch.tensor([4])
    for args in ((x, r, 0.3, seed), (x, None, 0.3, seed), (x.bfloat16(), r, 0.3, seed)):
        torch.library.opcheck(torch.ops.gptfast.dropout_add_fwd.default, args)
    torch.library.opcheck(torch.ops.gptfast.dropout_bwd.default, (x, 0.3, seed, torch.bfloat16))
    import gptfast.ops.triton  # noqa: F401 (registers the kernel ops)
    dropout_add_fwd, dropout_bwd = torch.ops.gptfast_triton.dropout_add_fwd, torch.ops.gptfast_triton.dropout_bwd

    dev = TRITON_DEVICE
    torch.library.opcheck(dropout_add_fwd, (x.to(dev), r.to(dev), 0.3, seed.to(dev)))
    torch.library.opcheck(dropout_bwd, (x.to(dev), 0.3, seed.to(dev), torch.float32))


def test_the_model_drops_with_the_op_and_backends_train_alike():
    """A training forward and backward of the model with dropout: reference and extension give the same
    loss and gradients (the same residual and embedding masks), and no nn.Dropout is left in the model."""
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    base = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.2, backend="reference")).double().train()
    assert not any(isinstance(m, torch.nn.Dropout) for m in base.modules())
    idx = torch.randint(0, 50257, (2, 17))
    results = []
    for backend in ("reference", "extension"):
        base.set_backend(backend)
        base.zero_grad()
        torch.manual_seed(123)
        loss = base(idx, idx)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in base.parameters()])))
    assert rel_error(results[1][0], results[0][0]) < 1e-12 and rel_error(results[1][1], results[0][1]) < 1e-10
    base.eval()
    with torch.no_grad():
        assert torch.equal(base(idx), base(idx))                  # eval: nothing dropped

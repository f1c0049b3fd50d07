"""Every op of gptfast.ops against its own contract, from its module's declarations (spec.py): its cases on every
backend against the float64 reference (outputs poisoned first), its bad inputs, gradcheck, opcheck of every
kernel op it calls, results that do not depend on where an element sits, torch.compile(fullgraph). Adding an
op adds no line here."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptfast import ops
from gptfast.compare.op_check import compare_case, run_case
from gptfast.compiled import set_poison_outputs
from gptfast.ops import OPS
from gptfast.ops.spec import computes

DEVICE = torch.device("cpu")
KERNEL_BACKENDS = ["extension", "triton"]
BACKENDS = ["torch", *KERNEL_BACKENDS, "auto"]
OP_NAMES = list(OPS)


def backends_for(op):
    return [b for b in BACKENDS if computes(op, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OP_NAMES)
def test_every_case_matches_the_float64_reference(name, dtype):
    """Output and every input gradient within the tolerance rule (compare/rules.py), kernels' outputs poisoned."""
    op = OPS[name]
    if str(dtype).removeprefix("torch.") not in op.dtypes:
        pytest.skip(f"{name} takes {', '.join(op.dtypes)} (its module says)")
    # bfloat16 in Triton's CPU interpreter runs in float32 (a Triton limitation): the GPU run checks its bf16
    backends = [b for b in backends_for(op) if not (b == "triton" and dtype == torch.bfloat16)]
    set_poison_outputs(True)
    try:
        rows = [row for i, case in enumerate(op.cases(True))
                for row in compare_case(op, case, backends, dtype, DEVICE, seed=i)]
    finally:
        set_poison_outputs(False)
    failed = [f"{r.backend} {r.case} {r.quantity}: {r.rel} > {r.tol} {r.note}" for r in rows if r.status == "FAIL"]
    assert not failed, "\n".join(failed)
    assert any(r.status == "PASS" for r in rows)


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_case_says_what_it_is_for_and_the_traps_are_covered(name):
    """Cases carry what found them; among them a strided view and a width that leaves a partial vector."""
    cases = OPS[name].cases(True)
    assert len({c.label for c in cases}) == len(cases), "duplicate labels"
    assert any(c.found for c in cases)
    labels = " ".join(c.label + " " + c.found for c in cases)
    assert any(word in labels for word in ("strided", "transposed", "fused qkv", "cache slice", "stacked")), labels


@pytest.mark.parametrize("name", OP_NAMES)
def test_bad_input_is_a_clear_error_naming_the_argument(name):
    bad = OPS[name].bad_inputs()
    assert bad
    for b in bad:
        with pytest.raises(b.error, match=b.match):
            b.call()


def smallest_case(op):
    return min(op.cases(True), key=lambda c: sum(t.numel() for t in c.build(torch.Generator().manual_seed(0)).values()))


@pytest.mark.parametrize("name", [n for n in OP_NAMES if not OPS[n].inference_only])
def test_gradcheck_in_float64(name):
    op = OPS[name]
    case = smallest_case(op)
    leaves = case.build(torch.Generator().manual_seed(0))
    names = list(leaves)
    for backend in [b for b in ("reference", "torch", "extension") if computes(op, b)]:
        if case.random and not ops.shares_dropout_rng(backend):
            continue

        def fn(*tensors, backend=backend):
            return case.call(backend, {**dict(zip(names, tensors)), **case.extra})
        inputs = tuple(t.clone().requires_grad_() for t in leaves.values())
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True), backend


class KernelCalls(TorchDispatchMode):
    """Records every call of our kernel ops (gptfast::*, gptfast_triton::*) below autograd."""
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("gptfast", "gptfast_triton") and func not in self.calls:
            self.calls[func] = (args, kwargs or {})
        return func(*args, **(kwargs or {}))


def _fresh(value, grad: bool):
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        return t.requires_grad_(grad and t.is_floating_point())
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v, grad) for v in value)
    return value


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck_every_kernel_op_the_op_calls(name, backend):
    """torch.library.opcheck (schema, fake kernel, autograd registration) on each kernel op, with the arguments a
    real forward and backward gave it."""
    op = OPS[name]
    if not computes(op, backend):
        pytest.skip(f"{backend} has no {name} (declared in its module)")
    recorder = KernelCalls()
    for case in op.cases(True)[:2]:
        leaves = case.build(torch.Generator().manual_seed(0))
        with recorder:
            run_case(op, case, backend, torch.float32, DEVICE, leaves, None)
    assert recorder.calls, f"{name} on {backend} called no kernel op"
    for func, (args, kwargs) in recorder.calls.items():
        grad = func._schema.name.endswith("_fwd") and op.kernels.get(func._schema.name.split("::")[-1]) is not None \
            and op.kernels[func._schema.name.split("::")[-1]].autograd is not None
        torch.library.opcheck(func, _fresh(args, grad), _fresh(kwargs, False))


def _rows_apart(op, backend, x):
    whole = op.rowwise(backend, x)
    for r in range(x.shape[0]):
        alone = op.rowwise(backend, x[r:r + 1].clone())
        assert torch.equal(alone, whole[r:r + 1]), f"row {r} alone differs from the same row in a batch"
    if op.elementwise:
        flat = x.flatten()
        for shift in range(1, 17):
            assert torch.equal(op.rowwise(backend, flat[shift:].clone()), whole.flatten()[shift:]), f"shift {shift}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", [n for n in OP_NAMES if OPS[n].rowwise is not None])
def test_an_element_does_not_depend_on_where_it_sits(name, backend, dtype):
    """A row computed alone gives the bits of the same row in a batch (and elementwise ops the same bits at any
    offset), at widths that leave a partial vector (the extension's GELU once did not: its scalar tail)."""
    op = OPS[name]
    if not computes(op, backend):
        pytest.skip(f"{backend} has no {name}")
    for C in (33, 129, 1023):
        x = torch.randn(5, C, generator=torch.Generator().manual_seed(C), dtype=torch.float64).to(dtype)
        _rows_apart(op, backend, x)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("name", OP_NAMES)
def test_torch_compile_fullgraph(name, backend):
    """The op compiles into one graph on every backend and gives the eager result (and gradients)."""
    op = OPS[name]
    if not computes(op, backend):
        pytest.skip(f"{backend} has no {name}")
    case = smallest_case(op)
    if case.random and not ops.shares_dropout_rng(backend):
        pytest.skip(f"{backend}'s dropout draws from torch's RNG: eager and compiled runs drop differently")
    leaves = case.build(torch.Generator().manual_seed(0))
    names = list(leaves)

    def fn(*tensors):
        return case.call(backend, {**dict(zip(names, tensors)), **case.extra})
    torch._dynamo.reset()
    grads = not op.inference_only
    eager_in = [t.float().requires_grad_(grads) for t in leaves.values()]
    compiled_in = [t.float().requires_grad_(grads) for t in leaves.values()]
    with torch.set_grad_enabled(grads):
        eager, compiled = fn(*eager_in), torch.compile(fn, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    if grads:
        torch.testing.assert_close(torch.autograd.grad(compiled.sum(), compiled_in),
                                   torch.autograd.grad(eager.sum(), eager_in), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in OP_NAMES if computes(OPS[n], "extension")])
def test_meta_tensors_take_the_fake_kernels(name):
    """The shapes of every case come out of the extension's fake kernels on meta tensors (what torch.compile and
    FSDP's meta init see): the same shape and dtype as the real run's."""
    op = OPS[name]
    if op.backends is not None:
        pytest.skip(f"{name}: only {', '.join(op.backends)} compute it, on the devices its module names")
    checked = 0
    for case in op.cases(True):
        if case.extra and any(t.dtype == torch.int64 for t in case.extra.values()):
            continue                     # class ids are range-checked in eager mode: a data-dependent read
        checked += 1
        leaves = case.build(torch.Generator().manual_seed(0))
        real = case.call("extension", {**{n: t.float() for n, t in leaves.items()}, **case.extra})
        meta = case.call("extension", {**{n: t.float().to("meta") for n, t in leaves.items()},
                                       **{n: t.to("meta") for n, t in case.extra.items()}})
        assert meta.device.type == "meta" and meta.shape == real.shape and meta.dtype == real.dtype, case.label
    if not checked:
        pytest.skip(f"{name}'s cases carry class ids, range-checked in eager mode (a data-dependent read)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", [n for n in OP_NAMES if OPS[n].native_16bit])
def test_16_bit_cpu_kernels_make_no_widened_copy(name, dtype):
    """Kernels that read 16-bit tensors natively (float32 math in registers): a forward and backward of every case
    convert no tensor (no aten._to_copy), and the gradients keep the inputs' dtype."""
    op = OPS[name]

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))
    for case in op.cases(True):
        leaves = {n: t.to(dtype).requires_grad_() for n, t in case.build(torch.Generator().manual_seed(0)).items()}
        with Calls() as calls:
            out = case.call("extension", {**leaves, **case.extra})
            grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        assert not [c for c in calls.seen if "_to_copy" in c or c.startswith("aten.to")], (case.label, calls.seen)
        assert all(g.dtype == dtype for g in grads), case.label

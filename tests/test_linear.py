"""The inference linear layers (ops.linear, ops.linear_int8, ops.linear_bf16) on every backend against
the float64 reference on the same (quantized) weights: odd shapes, strided x, bad input, op checks."""
import pytest
import torch

from conftest import ROOT, needs_gpu, randn64, rel_error
from gptfast import ops
from gptfast.ops.linear import dequantize_int8
from gptfast.compiled import set_poison_outputs
from gptfast.model.quantize import quantize_int8_rows
from gptfast.ops import reference

BACKENDS = ["reference", "torch", "extension", "triton", "auto"]
# Triton kernels run where Triton runs: on the GPU when there is one, else in its CPU interpreter
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]
WEIGHT_KINDS = ["float32", "bf16", "int8"]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Our kernels' outputs start as NaN: an element a kernel forgets to write fails the test."""
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def layer(kind, N, K, seed=1, bias=True):
    """(op, float32-x args after x, float64 reference args after x) for a layer of `kind` weights."""
    w, b = rand(N, K, seed=seed, scale=0.05), rand(N, seed=seed + 1) if bias else None
    b32 = b.float() if bias else None
    if kind == "int8":
        q, s = quantize_int8_rows(w)
        return ops.linear_int8, (q, s, b32), reference.linear_int8, (q, s.double(), b)
    if kind == "bf16":
        wb = w.to(torch.bfloat16)
        return ops.linear_bf16, (wb, b32), reference.linear_bf16, (wb, b)
    return ops.linear, (w.float(), b32), reference.linear, (w, b)


def check(kind, backend, x64, N, bias=True, tol=1e-5, x=None):
    fn, args, ref_fn, ref_args = layer(kind, N, x64.shape[-1], bias=bias)
    dev = device_for(backend)
    with torch.no_grad():
        out = fn(*to(dev, x64.float() if x is None else x, *args), backend=backend).cpu()
    ref = ref_fn(x64, *ref_args)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_error(out, ref) < tol, (kind, backend, tuple(x64.shape), N, rel_error(out, ref))


# rows of x 1..16 take our CPU kernel (17 and more: a GEMM); K not a multiple of the vector width or of 16
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("backend", ["reference", "torch", "extension", "auto"])
@pytest.mark.parametrize("M,K,N", [(1, 768, 7), (1, 1, 1), (2, 7, 13), (3, 100, 33), (5, 1023, 9), (8, 64, 50),
                                   (16, 33, 17), (17, 48, 5), (40, 129, 11)])
@pytest.mark.slow
def test_matches_the_float64_reference(kind, backend, M, K, N):
    check(kind, backend, rand(M, K, seed=M + K), N)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("M,K,N", [(1, 100, 7), (5, 33, 20), (16, 64, 3), (20, 16, 5)])
@pytest.mark.slow
def test_triton_matches_the_float64_reference(kind, M, K, N):
    check(kind, "triton", rand(M, K, seed=M), N)


@pytest.mark.parametrize("kind", WEIGHT_KINDS)
@pytest.mark.parametrize("M", [1, 8])
def test_gpt2_lm_head_width(kind, M):
    """N = 50,257 (GPT-2's vocabulary: not a multiple of the kernel's row tiles) through our kernel."""
    check(kind, "extension", rand(M, 768, seed=3), 50257)


@pytest.mark.parametrize("backend", ["extension", "triton", "torch"])
def test_strided_and_batched_x(backend):
    x64 = rand(3, 4, 2 * 96, seed=5)
    x = x64.float()[:, :, ::2]                                  # last-dim stride 2
    check("int8", backend, x64[:, :, ::2], 10, x=x)
    xt = rand(64, 3, seed=6).float().t()                       # (3, 64) with row stride 1
    check("float32", backend, xt.double(), 6, x=xt)


@pytest.mark.parametrize("backend", ["extension", "triton"])
def test_no_bias(backend):
    check("int8", backend, rand(2, 40), 9, bias=False)
    check("bf16", backend, rand(1, 40), 9, bias=False)


def test_a_row_gets_the_same_bits_alone_or_in_a_batch():
    """The documented math order of the CPU kernel: a row of x is computed the same way whatever M
    is (single and batched decoding pick the same tokens) and however many threads split N."""
    fn, args, _, _ = layer("int8", 700, 300)
    x = rand(16, 300, seed=9).float()
    with torch.no_grad():
        batched = fn(x, *args, backend="extension")
        for m in (0, 5, 15):
            assert torch.equal(fn(x[m:m + 1], *args, backend="extension")[0], batched[m])
        assert torch.equal(fn(x[3:10], *args, backend="extension"), batched[3:10])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(fn(x, *args, backend="extension"), batched)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_activations(backend):
    """bfloat16 x (a bf16 model): every backend within 1e-2 of float64 and within 2x PyTorch's own
    error at that precision; `torch` takes aten._weight_int8pack_mm here (K a multiple of 16)."""
    x64 = rand(4, 256, seed=11)
    fn, args, ref_fn, ref_args = layer("int8", 40, 256)
    bias_bf16 = args[2].to(torch.bfloat16)
    ref = ref_fn(x64, *ref_args)
    with torch.no_grad():
        out = fn(*to(device_for(backend), x64.to(torch.bfloat16), args[0], args[1], bias_bf16), backend=backend).cpu()
        torch_out = torch.nn.functional.linear(x64.to(torch.bfloat16), dequantize_int8(
            args[0], args[1], torch.bfloat16), bias_bf16)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref) < 1e-2
    assert rel_error(out, ref) <= 2 * rel_error(torch_out, ref) + 1e-6


def test_linear_with_autograd_is_pytorchs_linear():
    """Training goes through F.linear on every backend: gradients as PyTorch's."""
    x, w, b = (rand(*s, seed=i).requires_grad_() for i, s in enumerate([(3, 20), (7, 20), (7,)]))
    for backend in ("extension", "triton"):
        out = ops.linear(x, w, b, backend=backend)
        assert torch.autograd.gradcheck(lambda *a: ops.linear(*a, backend=backend), (x, w, b))
        assert out.grad_fn is not None


@pytest.mark.parametrize("call,error,message", [
    (lambda x, q, s, b: ops.linear_int8(x, q, s.double(), b), TypeError, "scales must be torch.float32"),
    (lambda x, q, s, b: ops.linear_int8(x, q, s[:-1], b), ValueError, r"scales must have shape \(7,\)"),
    (lambda x, q, s, b: ops.linear_int8(x, q, None, b), ValueError, "needs scales"),
    (lambda x, q, s, b: ops.linear_int8(x[:, :-1], q, s, b), ValueError, "K = x's last dim"),
    (lambda x, q, s, b: ops.linear_int8(x, q.float(), s, b), TypeError, "weight must be torch.int8"),
    (lambda x, q, s, b: ops.linear_int8(x.long(), q, s, b), TypeError, "x must be a floating-point"),
    (lambda x, q, s, b: ops.linear_int8(x, q, s, b.double()), TypeError, "bias must be torch.float32"),
    (lambda x, q, s, b: ops.linear_int8(x, q, s, b[:3]), ValueError, r"bias must have shape \(7,\)"),
    (lambda x, q, s, b: ops.linear_bf16(x, q, b), TypeError, "weight must be torch.bfloat16"),
    (lambda x, q, s, b: ops.linear(x, q, b), TypeError, r"weight must be torch.float32 \(x's dtype\)"),
    (lambda x, q, s, b: ops.linear_int8(x.requires_grad_(), q, s, b), RuntimeError, "for inference"),
])
@pytest.mark.parametrize("backend", ["extension", "triton", "torch"])
def test_bad_input_is_a_clear_error(call, error, message, backend):
    q, s = quantize_int8_rows(rand(7, 12))
    x, b = rand(2, 12).float(), rand(7).float()
    with pytest.raises(error, match=message):
        call(x, q, s, b)


def test_kernel_entry_points_check_their_arguments():
    """The compiled ops can be called directly; they name the bad argument too."""
    import gptfast.ops.extension  # noqa: F401 - registers the ops
    x, q = torch.randn(2, 12), torch.randint(-5, 5, (7, 12), dtype=torch.int8)
    op = torch.ops.gptfast.linear_fwd
    with pytest.raises(RuntimeError, match="int8 weights need scales"):
        op(x, q, None, None)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        op(x, q, torch.ones(7, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="x: the CPU linear kernel takes float32"):
        op(x.double(), q, torch.ones(7), None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(N, K\)"):
        op(x, q[:, :5], torch.ones(7), None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(7,\)"):
        op(x, q, torch.ones(7), torch.ones(6))


def test_opcheck():
    import gptfast.ops.triton  # noqa: F401 (registers the kernel ops)
    triton_linear = torch.ops.gptfast_triton.linear_fwd

    import gptfast.ops.extension  # noqa: F401
    q, s = quantize_int8_rows(rand(9, 33))
    cases = [(torch.randn(3, 33), q, s, torch.randn(9)), (torch.randn(1, 2, 33), q.float(), None, None),
             (torch.randn(20, 33), q.to(torch.bfloat16), None, torch.randn(9))]
    for args in cases:
        torch.library.opcheck(torch.ops.gptfast.linear_fwd.default, args)
        torch.library.opcheck(triton_linear, to(TRITON_DEVICE, *args))


def test_the_extension_kernel_runs_on_cpu_only_where_it_should():
    """A row count past the kernel's 16 takes a GEMM, float64 x falls back to PyTorch's ops: both
    still exact against the reference (covered above); here the profiler shows which ran."""
    fn, args, _, _ = layer("int8", 64, 128)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fn(rand(4, 128).float(), *args, backend="extension")
    names = {e.name for e in prof.events()}
    assert "gptfast::linear_fwd" in names and "aten::mm" not in names
    with torch.no_grad(), torch.profiler.profile() as prof:
        fn(rand(32, 128).float(), *args, backend="extension")
    assert "aten::mm" in {e.name for e in prof.events()}


def test_cuda_kernel_in_emulation_is_part_of_the_standalone_check():
    """csrc/cuda/linear.cu is one of the kernel files tests/test_cuda_emulation.py runs through the
    standalone check (csrc/cuda/test_kernels.cu), which calls its test."""
    text = (ROOT / "csrc" / "cuda" / "test_kernels.cu").read_text()
    assert (ROOT / "csrc" / "cuda" / "linear.cu").is_file() and "test_linear(" in text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int8", "float32"])
def test_strided_scales_bias_and_weight_are_read_by_their_strides(backend, kind):
    """Views into larger tensors (every other element, a transposed weight): the Triton kernel once read
    scales and bias as if packed - linear_int8 of ones with scales [1, 100, 2, 100][::2] gave [[2, 200]]."""
    device = device_for(backend)
    x = torch.ones(1, 2, device=device)
    if kind == "int8":
        w = torch.ones(2, 2, dtype=torch.int8, device=device)
        scales = torch.tensor([1.0, 100.0, 2.0, 100.0], device=device)[::2]
        assert not scales.is_contiguous()
        out = ops.linear_int8(x, w, scales, None, backend=backend)
        assert torch.equal(out.cpu(), torch.tensor([[2.0, 4.0]]))
        bias = torch.tensor([0.5, -7.0, 1.5, -7.0], device=device)[::2]
        assert torch.equal(ops.linear_int8(x, w, scales, bias, backend=backend).cpu(), torch.tensor([[2.5, 5.5]]))
    else:
        wt = torch.tensor([[1.0, 3.0], [2.0, 4.0]], device=device).t()        # (N, K) = [[1, 2], [3, 4]], strided
        bias = torch.tensor([10.0, -1.0, 20.0, -1.0], device=device)[::2]
        out = ops.linear(x, wt, bias, backend=backend)
        assert torch.equal(out.cpu(), torch.tensor([[13.0, 27.0]]))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("kind", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("M,K,N", [(1, 768, 50257), (1, 768, 3072), (8, 3072, 768), (3, 100, 9), (16, 64, 7),
                                   (20, 64, 7)])
@pytest.mark.parametrize("backend", ["extension", "triton"])
@needs_gpu
def test_cuda_decoding_linear(backend, M, K, N, kind, x_dtype):
    """The linear layer of decoding (csrc/cuda/linear.cu; gptfast/ops/triton/linear.py) against float64
    on the same quantized weights: 1-16 rows take the kernel, 20 a GEMM; K = 100 the unaligned path."""
    from gptfast.model.quantize import quantize_int8_rows

    x64, w64, b64 = cuda_rand(M, K, seed=31), cuda_rand(N, K, seed=32) * 0.05, cuda_rand(N, seed=33)
    if kind == "int8":
        q, s = quantize_int8_rows(w64)
        fn, args, ref = ops.linear_int8, (q, s), reference.linear_int8(x64, q, s.double(), b64)
    elif kind == "bf16":
        wb = w64.to(torch.bfloat16)
        fn, args, ref = ops.linear_bf16, (wb,), reference.linear_bf16(x64, wb, b64)
    else:
        if x_dtype != torch.float32:
            pytest.skip("float32 weights go with float32 activations (ops.linear takes x's dtype)")
        fn, args, ref = ops.linear, (w64.float(),), reference.linear(x64, w64, b64)
    with torch.no_grad():
        out = fn(x64.to(x_dtype), *args, b64.to(x_dtype), backend=backend)
    assert out.dtype == x_dtype and out.device.type == "cuda"
    assert rel_error(out, ref) < (1e-5 if x_dtype == torch.float32 else 1e-2)


def cuda_rand(*shape, seed=0):
    return randn64(*shape, seed=seed, device="cuda")


def test_bench_work_by_hand():
    """Bytes of a decoding linear layer: the weights in their storage type (+ int8 scales), x, bias, y."""
    f32 = torch.float32
    M, K, N = 2, 768, 3072
    activations = (M * K + N + M * N) * 4
    work = {name: ops.OPS[name].bench(name, (M, K, N)).work(f32, "fwd") for name in ("linear", "linear_bf16", "linear_int8")}
    assert work == {"linear": N * K * 4 + activations, "linear_bf16": N * K * 2 + activations,
                    "linear_int8": N * K + N * 4 + activations}

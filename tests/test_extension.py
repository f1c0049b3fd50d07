"""The `extension` backend (our C++ kernels) against the float64 reference twins."""
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, check_precision, interface_case, rel_error
from gptfast import ops
from gptfast.compiled import load_extension, set_poison_outputs
from gptfast.ops import reference
from gptfast.ops.attention import reference as attention_reference
from gptfast.ops.dropout_rng import dropout_keep_mask

_C = load_extension()   # the suite builds it; a failure here says why
KERNELS = torch.ops.gptfast


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Kernel outputs start as NaN, so any element a kernel fails to write fails the test."""
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def compare(fn, ref_fn, inputs64, dtype, tol, seed=1):
    """Run fn on `inputs64` cast to `dtype` and ref_fn in float64; compare outputs and grads."""
    ref_in = [t.clone().requires_grad_() for t in inputs64]
    ref = ref_fn(*ref_in)
    dout = rand(*ref.shape, seed=seed)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ins = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    out = fn(*ins)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, ins, dout.to(dtype))
    errors = [rel_error(out, ref)] + [rel_error(g, rg) for g, rg in zip(grads, ref_grads)]
    assert max(errors) < tol, f"relative errors (out, grads...) {errors}"
    assert all(torch.isfinite(t).all() for t in (out, *grads))


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


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


# ----------------------------------------------------------------------------- attention
def qkv(B, H, T, D, seed=0):
    return [rand(B, H, T, D, seed=seed + i) for i in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 3, 7, 64), (1, 2, 129, 80), (1, 1, 1000, 64),
                                     (2, 1, 65, 128), (1, 2, 33, 24)])
@pytest.mark.slow
def test_causal_attention_matches_reference(dtype, B, H, T, D):
    compare(lambda *a: ops.causal_attention(*a, backend="extension"), reference.causal_attention,
            qkv(B, H, T, D), dtype, TOL[dtype])


@pytest.mark.parametrize("T", [1, 7, 100])
def test_full_attention_matches_reference(T):
    scale = 0.3
    compare(lambda q, k, v: KERNELS.attention_fwd(q, k, v, False, scale, 0.0, torch.zeros(1, dtype=torch.long))[0],
            lambda q, k, v: attention_reference(q, k, v, causal=False, scale=scale),
            qkv(2, 2, T, 32, seed=20), torch.float64, 1e-10)


def test_lse_is_the_log_normalizer():
    q, k, v = qkv(1, 2, 50, 16, seed=30)
    _, lse = KERNELS.attention_fwd(q, k, v, True, 0.25, 0.0, torch.zeros(1, dtype=torch.long))
    scores = (q @ k.transpose(-2, -1)) * 0.25
    scores = scores.masked_fill(torch.triu(torch.ones(50, 50, dtype=torch.bool), 1), float("-inf"))
    assert rel_error(lse, torch.logsumexp(scores, -1)) < 1e-12


def test_attention_noncontiguous_inputs():
    q, k, v = [rand(2, 37, 3, 16, seed=40 + i).transpose(1, 2) for i in range(3)]  # (B, H, T, D) views
    out = ops.causal_attention(q, k, v, backend="extension")
    assert rel_error(out, reference.causal_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize("T,causal", [(1, True), (45, True), (130, True), (33, False)])
def test_dropout_drops_exactly_the_reference_weights(T, causal):
    q, k, v = qkv(2, 3, T, 16, seed=50)
    seed = torch.tensor([987654321987], dtype=torch.int64)
    compare(lambda *a: KERNELS.attention_fwd(*a, causal, 0.25, 0.3, seed)[0],
            lambda *a: attention_reference(*a, causal=causal, scale=0.25, dropout_p=0.3, seed=seed),
            [q, k, v], torch.float64, 1e-10)


@pytest.mark.parametrize("T", [40, 8])        # the tiled kernel; the few-rows (decoding) kernel
def test_kernel_drops_bit_for_bit_the_same_weights(T):
    # q = k = 0 makes every visible weight 1/(t+1); v = identity makes output row t *be* the
    # weight row, so the kernel's dropped weights are exactly its zeros.
    q = torch.zeros(1, 2, T, T, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64).expand(1, 2, T, T).contiguous()
    seed = torch.tensor([2024], dtype=torch.int64)
    out, _ = KERNELS.attention_fwd(q, q, v, True, 1.0, 0.4, seed)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    expected_keep = dropout_keep_mask(seed, 2, T, T, 0.4).view(1, 2, T, T) & causal
    assert torch.equal(out != 0, expected_keep)
    assert 0 < expected_keep.sum() < causal.sum() * 2          # some kept, some dropped


def test_dropout_seed_matters_and_keep_rate():
    q, k, v = qkv(1, 2, 64, 16, seed=60)
    a = ops.causal_attention(q, k, v, 0.2, seed=1, backend="extension")
    b = ops.causal_attention(q, k, v, 0.2, seed=1, backend="extension")
    c = ops.causal_attention(q, k, v, 0.2, seed=2, backend="extension")
    assert torch.equal(a, b) and not torch.allclose(a, c)
    for p in (0.1, 0.5):
        keep = dropout_keep_mask(torch.tensor([12345]), 8, 256, 256, p)
        assert abs(keep.double().mean().item() - (1 - p)) < 0.01      # 524,288 draws: sd ~ 0.0007
    assert dropout_keep_mask(7, 1, 4, 4, 0.0).all()


def test_dropout_seed_is_drawn_from_torch_rng():
    q, k, v = qkv(1, 1, 16, 8, seed=70)
    torch.manual_seed(3)
    a = ops.causal_attention(q, k, v, 0.5, backend="extension")
    torch.manual_seed(3)
    b = ops.causal_attention(q, k, v, 0.5, backend="reference")
    assert rel_error(a, b) < 1e-12          # same torch seed -> same drawn seed -> same mask


def cache_slices(B, H, Tk, D, dtype, seed, length=300):
    """k, v as a model's KV cache hands them over: the first Tk positions of a preallocated
    (B, H, length, D) buffer - views whose heads sit `length` rows apart, not Tk."""
    cache = rand(2, B, H, length, D, seed=seed, dtype=dtype)
    return cache[0][:, :, :Tk], cache[1][:, :, :Tk]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Tq,Tk,D,p", [(1, 1, 64, 0.0), (1, 200, 80, 0.0), (3, 70, 20, 0.0), (8, 8, 16, 0.0),
                                       (8, 129, 128, 0.0), (1, 200, 64, 0.3), (5, 33, 24, 0.3)])
def test_decoding_from_a_cache_slice_matches_reference(dtype, Tq, Tk, D, p):
    """Up to 8 query rows take the few-rows kernel, which reads K and V where they lie: a slice of a
    longer cache (heads 300 rows apart), head dims with vector tails (20, 24) and without, dropout;
    forward against float64, then the gradients through the tiled backward."""
    q = rand(2, 3, Tq, D, seed=130, dtype=dtype)
    k, v = cache_slices(2, 3, Tk, D, dtype, seed=131)
    assert not k.is_contiguous() or Tk == 300
    seed = torch.tensor([2718], dtype=torch.int64)
    fn = lambda *a: ops.causal_attention(*a, dropout_p=p, seed=seed, backend="extension")  # noqa: E731
    ref = lambda *a: reference.causal_attention(*a, dropout_p=p, seed=seed)                 # noqa: E731
    compare(fn, ref, [q.double(), k.double().contiguous(), v.double().contiguous()], dtype, TOL[dtype])
    out = fn(q, k, v)                                   # the strided views themselves, no copy made first
    assert rel_error(out, ref(q.double(), k.double(), v.double())) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_half_precision_cache(dtype):
    q = rand(1, 4, 1, 64, seed=140, dtype=dtype)
    k, v = cache_slices(1, 4, 150, 64, dtype, seed=141)
    out = ops.causal_attention(q, k, v, backend="extension")
    ref = reference.causal_attention(q.double(), k.double(), v.double())
    torch_err = rel_error(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False), ref)
    assert out.dtype == dtype and rel_error(out, ref) < max(1e-2, 2 * torch_err)


def test_decoding_reads_the_cache_in_place():
    """One decoding step: no copy of the cache slice (a contiguous() of K or V, or K's transposed copy
    that the tiled kernel makes) - the profiler sees no copy below the op."""
    q = rand(2, 12, 1, 64, seed=150, dtype=torch.float32)
    k, v = cache_slices(2, 12, 257, 64, torch.float32, seed=151)
    seed, q9 = torch.zeros(1, dtype=torch.long), rand(2, 12, 9, 64, seed=152, dtype=torch.float32)
    with torch.profiler.profile() as prof:
        KERNELS.attention_fwd(q, k, v, True, 0.125, 0.0, seed)
    names = {e.name for e in prof.events()}
    assert "gptfast::attention_fwd" in names, names
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::zeros"}, names
    with torch.profiler.profile() as prof:               # the check can see copies: 9 rows take the tiled kernel
        KERNELS.attention_fwd(q9, k, v, True, 0.125, 0.0, seed)
    assert "aten::copy_" in {e.name for e in prof.events()}


# ----------------------------------------------------------------------------- gradcheck, opcheck
def test_gradcheck_float64():
    x, w, b = (rand(3, 6, seed=80 + i).requires_grad_() if i == 0 else rand(6, seed=80 + i).requires_grad_()
               for i in range(3))
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a, backend="extension"), (x, w, b))
    assert torch.autograd.gradcheck(lambda a: ops.gelu(a, backend="extension"), (rand(11, seed=90).requires_grad_(),))
    q, k, v = [t.requires_grad_() for t in qkv(1, 2, 9, 8, seed=100)]
    assert torch.autograd.gradcheck(lambda *a: ops.causal_attention(*a, backend="extension"), (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: ops.causal_attention(*a, dropout_p=0.3, seed=5, backend="extension"),
                                    (q, k, v))


def opcheck_cases():
    x, w, b = rand(4, 5, 32, seed=110, dtype=torch.float32), rand(32, seed=111, dtype=torch.float32), \
        rand(32, seed=112, dtype=torch.float32)
    y, mean, rstd = KERNELS.layer_norm_fwd(x, w, b, 1e-5)
    q, k, v = [rand(2, 2, 19, 16, seed=120 + i, dtype=torch.float32) for i in range(3)]
    seed = torch.tensor([42], dtype=torch.int64)
    o, lse = KERNELS.attention_fwd(q, k, v, True, 0.25, 0.1, seed)
    g = lambda t: t.clone().requires_grad_()  # noqa: E731
    return {
        "layer_norm_fwd": (KERNELS.layer_norm_fwd.default, (g(x), g(w), g(b), 1e-5)),
        "layer_norm_bwd": (KERNELS.layer_norm_bwd.default, (rand(4, 5, 32, seed=113, dtype=torch.float32), x, w, mean, rstd)),
        "gelu_fwd": (KERNELS.gelu_fwd.default, (g(x),)),
        "gelu_bwd": (KERNELS.gelu_bwd.default, (y, x)),
        "attention_fwd": (KERNELS.attention_fwd.default, (g(q), g(k), g(v), True, 0.25, 0.1, seed)),
        "attention_bwd": (KERNELS.attention_bwd.default, (rand(2, 2, 19, 16, seed=125, dtype=torch.float32), q, k, v,
                                                      o, lse, True, 0.25, 0.1, seed)),
    }


@pytest.mark.parametrize("name", list(opcheck_cases()))
def test_opcheck(name):
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,message", [
    (lambda: KERNELS.attention_fwd(rand(2, 3, 4), rand(2, 3, 4), rand(2, 3, 4), True, 1.0, 0.0,
                               torch.zeros(1, dtype=torch.long)), "q must have rank 4"),
    (lambda: KERNELS.attention_fwd(rand(1, 1, 4, 8), rand(1, 1, 4, 8, dtype=torch.float32), rand(1, 1, 4, 8), True,
                               1.0, 0.0, torch.zeros(1, dtype=torch.long)), "k has dtype Float but q has Double"),
    (lambda: KERNELS.attention_fwd(rand(1, 1, 4, 300), rand(1, 1, 4, 300), rand(1, 1, 4, 300), True, 1.0, 0.0,
                               torch.zeros(1, dtype=torch.long)), "head dim D=300 is unsupported"),
    (lambda: KERNELS.attention_fwd(rand(1, 1, 4, 8), rand(1, 1, 4, 8), rand(1, 1, 5, 8), True, 1.0, 0.0,
                               torch.zeros(1, dtype=torch.long)), "v must have k's shape"),
    (lambda: KERNELS.attention_fwd(rand(1, 1, 4, 8), rand(1, 1, 4, 8), rand(1, 1, 4, 8), True, 1.0, 0.0,
                               torch.zeros(1)), "seed must be a one-element int64 tensor"),
    (lambda: KERNELS.attention_fwd(torch.ones(1, 1, 4, 8, dtype=torch.int32), rand(1, 1, 4, 8), rand(1, 1, 4, 8), True,
                               1.0, 0.0, torch.zeros(1, dtype=torch.long)), "q must be a floating-point tensor"),
    (lambda: KERNELS.layer_norm_fwd(rand(2, 8), rand(4), rand(8), 1e-5), r"weight must have shape \(8,\)"),
    (lambda: KERNELS.layer_norm_fwd(rand(2, 8), rand(8), rand(8), -1.0), "eps must be positive"),
    (lambda: KERNELS.layer_norm_bwd(rand(2, 8), rand(2, 8), rand(8), rand(2, dtype=torch.float32), rand(2)),
     "mean must have dtype Double"),
    (lambda: KERNELS.gelu_fwd(torch.arange(4)), "x must be a floating-point tensor"),
    (lambda: KERNELS.gelu_bwd(rand(3), rand(4)), "dy must have x's shape"),
    (lambda: KERNELS.layer_norm_fwd(rand(2, 8, dtype=torch.bfloat16), rand(8, dtype=torch.float32), rand(8), 1e-5),
     "weight has dtype Float but x has BFloat16"),
    (lambda: KERNELS.gelu_fwd(rand(4).to(torch.int32)), "x must be a floating-point tensor"),
])
def test_bad_inputs_raise_naming_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer_norm", "gelu", "attention", "cross_entropy"])
def test_half_precision_cpu_tensors_are_computed_in_float32(op, dtype):
    """bfloat16 autocast on CPU hands the ops half-precision tensors: the kernels read them as they are
    (float32 math in registers and tiles) - no worse than PyTorch's own CPU ops at that precision."""
    check_precision(*interface_case(op, "extension"), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["layer_norm", "gelu", "cross_entropy", "attention"])
def test_half_precision_cpu_ops_make_no_widened_copies(op, dtype):
    """Native 16-bit CPU kernels: forward and backward run without a single dtype conversion of a
    tensor (no aten._to_copy), and the outputs and gradients keep the input's dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = rand(6, 1023, dtype=dtype, seed=1).requires_grad_()
    if op == "attention":
        x = rand(2, 3, 129, 80, dtype=dtype, seed=4).requires_grad_()     # q = k = v, head dim 80
    w, b = rand(1023, dtype=dtype, seed=2).requires_grad_(), rand(1023, dtype=dtype, seed=3)
    targets = torch.randint(0, 1023, (6,))
    seed = torch.tensor([7])                          # the dropout seed, drawn outside the recording
    with Calls() as calls:
        if op == "layer_norm":
            out = ops.layer_norm(x, w, b, backend="extension")
        elif op == "gelu":
            out = ops.gelu(x, backend="extension")
        elif op == "attention":
            out = ops.causal_attention(x, x, x, dropout_p=0.1, seed=seed, backend="extension")
        else:
            out = ops.cross_entropy(x, targets, backend="extension")
        out.backward(torch.ones_like(out))
    assert any(c.startswith(f"gptfast.{op}_fwd") for c in calls.seen), calls.seen
    if op == "attention":          # its one conversion is K's transposed float32 copy, made inside the kernel
        assert any(c.startswith("gptfast.attention_bwd") for c in calls.seen), calls.seen
    assert not [c for c in calls.seen if "_to_copy" in c or c.startswith("aten.to")], calls.seen
    assert x.grad.dtype == dtype and (op != "layer_norm" or w.grad.dtype == dtype)
    assert out.dtype == (torch.float32 if op == "cross_entropy" else dtype)


# ----------------------------------------------------------------------------- the model
def small_model(backend, drop_rate=0.0, seed=0):
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=101, context_length=48, emb_dim=64, n_heads=4, n_layers=2,
                              drop_rate=drop_rate, backend=backend))


def test_twenty_training_steps_match_reference_with_dropout(verdict_text, gpt2_tokenizer):
    from conftest import training_losses

    ids = torch.tensor(gpt2_tokenizer.encode(verdict_text)[:4000]) % 101
    ref = training_losses("reference", ids, steps=20, batch=4, T=40, context_length=48)
    ext = training_losses("extension", ids, steps=20, batch=4, T=40, context_length=48)
    assert (ref - ext).abs().max() < 1e-4, (ref, ext)
    assert ref[-5:].mean() < ref[:5].mean()          # it is actually training


@pytest.mark.slow
def test_torch_compile_fullgraph_extension():
    model = small_model("extension").eval()
    idx = torch.randint(0, 101, (2, 30))
    eager = model(idx)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(idx)
    assert rel_error(out, eager) < 1e-5
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), idx.flatten())
    loss.backward()
    assert model.trf_blocks[0].att.W_query.weight.grad is not None
    train_model = small_model("extension", drop_rate=0.1).train()      # dropout seeds inside the graph
    train_out = torch.compile(train_model, fullgraph=True)(idx)
    assert torch.isfinite(train_out).all()


# ----------------------------------------------------------------------------- build & tokenizer
def test_meta_tensors_use_the_fake_kernels():
    q = torch.empty(2, 3, 17, 16, device="meta")
    assert ops.causal_attention(q, q, q, backend="extension").shape == q.shape
    assert ops.layer_norm(torch.empty(4, 8, device="meta"), torch.empty(8, device="meta"),
                          torch.empty(8, device="meta"), backend="extension").device.type == "meta"


def test_build_info_and_available_backends():
    info = _C.build_info()
    assert "cpu" in info["compiled_backends"] and info["cpu_isa"]
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert ops.available_backends()["extension"].startswith("available")


def test_stale_or_missing_extension_is_reported_not_fatal():
    code = ("import gptfast._build_meta as m; m.source_hash = lambda root=None: 'f' * 16\n"
            "import gptfast, gptfast.ops as o; print(o.available_backends()['extension'])")
    env = {**os.environ, "GPTFAST_JIT": "0", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unavailable" in result.stdout and "stale" in result.stdout and "pip install -e ." in result.stdout


def test_native_bpe_trainer_gives_identical_merges(large_text):
    import regex
    from collections import Counter

    from gptfast.tokenizer import GPT2_SPLIT_PATTERN, learn_merges

    counts = Counter(tuple(c.encode()) for c in regex.findall(GPT2_SPLIT_PATTERN, large_text[:300_000]))
    assert learn_merges(counts, 500, native=True) == learn_merges(counts, 500, native=False)


@pytest.mark.parametrize("Tq,Tk,p", [(1, 70, 0.0), (5, 9, 0.0), (65, 130, 0.0), (33, 100, 0.3)])
def test_fewer_queries_than_keys_with_gradients_and_dropout(Tq, Tk, p):
    q = rand(2, 3, Tq, 16, seed=90)
    k, v = rand(2, 3, Tk, 16, seed=91), rand(2, 3, Tk, 16, seed=92)
    seed = torch.tensor([77], dtype=torch.int64)
    compare(lambda *a: ops.causal_attention(*a, dropout_p=p, seed=seed, backend="extension"),
            lambda *a: reference.causal_attention(*a, dropout_p=p, seed=seed), [q, k, v], torch.float64, 1e-10)


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

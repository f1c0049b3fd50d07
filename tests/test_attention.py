"""ops.causal_attention on every backend: the textbook formula, causality, scale, dropout (the shared mask, bit
for bit), fewer queries than keys (a KV cache), the CPU kernels' paths (tiles, the few-rows decoding kernel reading
the cache in place, lse), Triton's block shapes and CUDA's plain and tensor-core kernels. The cases every op shares
are tests/test_op_contract.py's."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, TOL, TRITON_DEVICE, check_precision, crand, needs_gpu, precision_errors, rand,
                      rel_error, run_with_grads, trand)
from conftest import compare_to_reference as compare
from gptfast import ops
from gptfast.ops import reference
from gptfast.ops.attention import reference as attention_reference
from gptfast.ops.dropout_rng import dropout_keep_mask

KERNELS = ops.get_backend("extension").KERNELS  # our C++/CUDA kernel ops, their fakes and autograd registered
import gptfast.ops.triton  # noqa: E402,F401   (registers torch.ops.gptfast_triton)
TRITON_KERNELS = torch.ops.gptfast_triton
BACKENDS = ["reference", "torch"]             # the interface tests below: PyTorch-only backends
CPU_DTYPES = [torch.float32, torch.float16]   # Triton's interpreter computes bf16 wrongly
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")   # kernel outputs start as NaN


# ----------------------------------------------------------------------------- the interface: reference and torch


def attention_inputs(B, H, T, D, dtype=torch.float32, requires_grad=False, noncontiguous=False):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    if noncontiguous:  # (B, T, H, D) storage viewed as (B, H, T, D), as the model produces
        qkv = [torch.randn(B, T, H, D, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3)]
    else:
        qkv = [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]
    return [t.to(dtype).requires_grad_(requires_grad) for t in qkv]


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 3, 7, 64), (1, 2, 129, 80), (1, 1, 1000, 32),
                                     (2, 2, 33, 128)])
@pytest.mark.slow
def test_interface_attention_float32_against_float64_reference(backend, B, H, T, D):
    q, k, v = attention_inputs(B, H, T, D, torch.float64, requires_grad=True)
    ref, ref_grads = run_with_grads(lambda *a: ops.causal_attention(*a, backend="reference"), [q, k, v])
    q32, k32, v32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, grads = run_with_grads(lambda *a: ops.causal_attention(*a, backend=backend), [q32, k32, v32])
    assert out.dtype == torch.float32 and out.shape == (B, H, T, D)
    assert rel_error(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_error(g, rg) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_interface_attention_noncontiguous_inputs(backend):
    q, k, v = attention_inputs(2, 4, 37, 16, noncontiguous=True)
    assert not q.is_contiguous()
    out = ops.causal_attention(q, k, v, backend=backend)
    ref = ops.causal_attention(*(t.contiguous().double() for t in (q, k, v)), backend="reference")
    assert rel_error(out, ref) < 1e-5


def test_interface_reference_attention_is_the_textbook_formula():
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
def test_interface_attention_is_causal(backend):
    q, k, v = attention_inputs(1, 2, 12, 16)
    out = ops.causal_attention(q, k, v, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] += 5.0                                   # change the future only
    v2[:, :, 6:] -= 3.0
    out2 = ops.causal_attention(q, k2, v2, backend=backend)
    assert torch.equal(out[:, :, :6], out2[:, :, :6])
    assert not torch.allclose(out[:, :, 6:], out2[:, :, 6:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_interface_attention_custom_scale(backend):
    q, k, v = attention_inputs(1, 2, 9, 16, torch.float64)
    out = ops.causal_attention(q, k, v, scale=0.3, backend=backend)
    ref = ops.causal_attention(q * (0.3 * 4.0), k, v, backend="reference")   # 1/sqrt(16) = 0.25
    assert rel_error(out, ref) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_interface_attention_dropout_is_seeded_and_unbiased(backend):
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
def test_interface_attention_gradcheck_float64(backend):
    q, k, v = attention_inputs(1, 2, 5, 8, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.causal_attention(*a, backend=backend), (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 9), (3, 70), (65, 130)])
def test_interface_attention_with_fewer_queries_than_keys(backend, Tq, Tk):
    # the queries are the last Tq positions: same as full causal attention over Tk, last Tq rows
    q = attention_inputs(2, 3, Tk, 16, torch.float64)[0][:, :, Tk - Tq:]
    _, k, v = attention_inputs(2, 3, Tk, 16, torch.float64)
    q_full = torch.cat([torch.zeros_like(k[:, :, :Tk - Tq]), q], dim=2)
    expected = ops.causal_attention(q_full, k, v, backend="reference")[:, :, Tk - Tq:]
    assert rel_error(ops.causal_attention(q, k, v, backend=backend), expected) < 1e-12
    if Tq < Tk:
        with pytest.raises(ValueError, match="fewer than q's"):
            ops.causal_attention(k, q, q, backend=backend)             # keys must cover the queries


# ----------------------------------------------------------------------------- the C++ kernels (extension, CPU)


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


@pytest.mark.parametrize("Tq,Tk,p", [(1, 70, 0.0), (5, 9, 0.0), (65, 130, 0.0), (33, 100, 0.3)])
def test_fewer_queries_than_keys_with_gradients_and_dropout(Tq, Tk, p):
    q = rand(2, 3, Tq, 16, seed=90)
    k, v = rand(2, 3, Tk, 16, seed=91), rand(2, 3, Tk, 16, seed=92)
    seed = torch.tensor([77], dtype=torch.int64)
    compare(lambda *a: ops.causal_attention(*a, dropout_p=p, seed=seed, backend="extension"),
            lambda *a: reference.causal_attention(*a, dropout_p=p, seed=seed), [q, k, v], torch.float64, 1e-10)


# ----------------------------------------------------------------------------- Triton


def tqkv(B, H, T, D, seed=0):
    return [trand(B, H, T, D, seed=seed + i) for i in range(3)]


def sdpa(causal, scale):
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 2, 7, 64), (1, 2, 129, 80), (1, 1, 65, 32)])
@pytest.mark.slow
def test_triton_causal_attention_matches_reference(dtype, B, H, T, D):
    check_precision(lambda *a: ops.causal_attention(*a, backend="triton"), sdpa(True, None), reference.causal_attention,
          tqkv(B, H, T, D), dtype)


@pytest.mark.parametrize("T", [7, 70])
def test_triton_full_attention_matches_reference(T):
    fn = lambda q, k, v: TRITON_KERNELS.attention_fwd(q, k, v, False, 0.3, 0.0, torch.zeros(1, dtype=torch.long))[0]  # noqa: E731
    check_precision(fn, sdpa(False, 0.3), lambda q, k, v: attention_reference(q, k, v, causal=False, scale=0.3),
          tqkv(2, 1, T, 16, seed=5), torch.float32)


def test_triton_attention_noncontiguous_inputs():
    q, k, v = [trand(2, 37, 3, 16, seed=40 + i).transpose(1, 2).float() for i in range(3)]
    out = ops.causal_attention(q, k, v, backend="triton")
    assert rel_error(out, reference.causal_attention(q.double(), k.double(), v.double())) < 1e-5


@pytest.mark.parametrize("T,causal", [(45, True), (33, False)])
def test_triton_dropout_matches_reference_and_extension(T, causal):
    q, k, v = tqkv(2, 3, T, 16, seed=50)
    seed = torch.tensor([987654321987], dtype=torch.int64)
    fn = lambda *a: TRITON_KERNELS.attention_fwd(*a, causal, 0.25, 0.3, seed)[0]  # noqa: E731
    ref = lambda *a: attention_reference(*a, causal=causal, scale=0.25, dropout_p=0.3, seed=seed)  # noqa: E731
    assert max(precision_errors(fn, ref, [q, k, v], torch.float32)) < 1e-5


@pytest.mark.parametrize("Tq,Tk,p", [(1, 70, 0.0), (5, 9, 0.0), (65, 130, 0.0), (33, 100, 0.3)])
@pytest.mark.slow
def test_triton_fewer_queries_than_keys_with_gradients_and_dropout(Tq, Tk, p):
    """The KV-cache case: queries are the last Tq of Tk positions (masks and dropout rows shifted)."""
    assert kv_cache_errors(2, Tq, Tk, p, seed=90) < 1e-5


def kv_cache_errors(B, Tq, Tk, p, seed):
    """Largest relative error (output and the three gradients) of the Triton causal attention with
    Tq queries at the end of Tk keys, against the float64 reference."""
    q = trand(B, 3 if B > 1 else 2, Tq, 16, seed=seed)
    k, v = (trand(q.shape[0], q.shape[1], Tk, 16, seed=seed + i) for i in (1, 2))
    rng = torch.tensor([seed], dtype=torch.int64)
    fn = lambda *a: ops.causal_attention(*a, dropout_p=p, seed=rng, backend="triton")  # noqa: E731
    ref = lambda *a: reference.causal_attention(*a, dropout_p=p, seed=rng)  # noqa: E731
    return max(precision_errors(fn, ref, [q, k, v], torch.float32))


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("Tq,Tk,p", [(129, 129, 0.0), (33, 100, 0.3)])
@pytest.mark.slow
def test_triton_every_block_shape_splits_masked_from_unmasked_key_blocks_correctly(block_m, block_n, Tq, Tk, p):
    """The kernels run key blocks wholly below the diagonal without a mask and only the diagonal ones
    with it; the split depends on BLOCK_M / BLOCK_N, and the GPU's autotune configs have ratios 1/2 to 2
    that the interpreter's single config (64 x 64) never uses - so each ratio runs here, forward and
    both backward kernels, causal, with a KV-cache offset and with dropout."""
    import triton as _triton
    from gptfast.ops.triton import attention as kernels

    tuned = (kernels._attn_fwd_kernel, kernels._attn_bwd_dkdv_kernel, kernels._attn_bwd_dq_kernel)
    saved = [(t.configs, dict(t.cache)) for t in tuned]
    try:
        for t in tuned:
            t.configs = [_triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4)]
            t.cache.clear()
        assert kv_cache_errors(1, Tq, Tk, p, seed=300) < 1e-5
    finally:
        for t, (configs, cache) in zip(tuned, saved):
            t.configs = configs
            t.cache.clear()
            t.cache.update(cache)


def test_triton_kernel_drops_bit_for_bit_the_same_weights():
    T = 40   # q = k = 0 and v = identity: output row t is the (dropped) weight row t
    q = torch.zeros(1, 2, T, T, device=TRITON_DEVICE)
    v = torch.eye(T, device=TRITON_DEVICE).expand(1, 2, T, T).contiguous()
    seed = torch.tensor([2024], dtype=torch.int64)
    out, _ = TRITON_KERNELS.attention_fwd(q, q, v, True, 1.0, 0.4, seed)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=TRITON_DEVICE))
    keep = dropout_keep_mask(seed, 2, T, T, 0.4, device=TRITON_DEVICE).view(1, 2, T, T) & causal
    assert torch.equal(out != 0, keep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPT-2-shape attention in all dtypes needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_attention_gpt2_shapes_on_gpu(dtype):
    check_precision(lambda *a: ops.causal_attention(*a, backend="triton"), sdpa(True, None), reference.causal_attention,
          tqkv(2, 12, 1024, 64, seed=60), dtype, fp32_tol=3e-4)   # fp32 tl.dot uses tf32 on GPU


def test_triton_gpu_launches_try_only_the_configs_of_their_tile_class():
    """On a GPU the autotuner is pruned to the launch's tile class (attention.GPU_TILES): the configs
    that .ci/triton_aot_check.py compiled for that dtype width and head dim, and no other."""
    import triton as _triton
    from gptfast.ops.triton import attention as kernels

    for kind, per_class in kernels.GPU_TILES.items():
        every = [_triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for tiles in per_class.values() for bm, bn, w, s in tiles]
        prune = kernels._prune(kind)["early_config_prune"]
        for dtype, block_d, cls in ((torch.bfloat16, 64, (2, 64)), (torch.float16, 128, (2, 128)),
                                    (torch.float32, 32, (4, 64)), (torch.float32, 128, (4, 128))):
            kept = prune(every, {"q_ptr": torch.empty(1, dtype=dtype)}, CAUSAL=True, DROPOUT=False, BLOCK_D=block_d)
            assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} \
                == set(per_class[cls]), (kind, dtype, block_d)


# ----------------------------------------------------------------------------- CUDA (GPU only)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D", [(4, 12, 1024, 64), (1, 2, 1, 16), (2, 3, 7, 64), (1, 2, 129, 80),
                                     (1, 1, 1000, 128)])
@needs_gpu
def test_cuda_causal_attention(dtype, B, H, T, D):
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    check_precision(lambda *a: ops.causal_attention(*a, backend="extension"), sdpa, reference.causal_attention,
                    [crand(B, H, T, D, seed=5 + i) for i in range(3)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D", [(2, 12, 256, 64), (1, 2, 129, 80), (1, 1, 7, 128)])
@needs_gpu
def test_cuda_plain_and_tensor_core_attention_both_meet_the_bar(dtype, B, H, T, D, monkeypatch):
    """fp16/bf16 with D % 16 == 0 run on the WMMA kernels (attention_tc.cu); the plain fp32-math
    kernels (attention.cu) stay reachable with GPTFAST_CUDA_ATTENTION=simt: both pass the rule."""
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    inputs = [crand(B, H, T, D, seed=20 + i) for i in range(3)]
    ext = lambda *a: ops.causal_attention(*a, backend="extension")  # noqa: E731
    check_precision(ext, sdpa, reference.causal_attention, inputs, dtype)
    monkeypatch.setenv("GPTFAST_CUDA_ATTENTION", "simt")
    check_precision(ext, sdpa, reference.causal_attention, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@needs_gpu
def test_cuda_attention_dropout_matches_the_reference(dtype):
    """Same seed, same mask: outputs and gradients against the float64 reference with dropout."""
    seed = torch.tensor([77], dtype=torch.int64)
    fn = lambda backend: lambda q, k, v: ops.causal_attention(q, k, v, dropout_p=0.2, seed=seed,  # noqa: E731
                                                                backend=backend)
    check_precision(fn("extension"), fn("reference"), fn("reference"), [crand(2, 3, 100, 64, seed=30 + i)
                                                                        for i in range(3)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq,Tk,D,p", [(1, 70, 64, 0.0), (5, 9, 80, 0.0), (65, 130, 64, 0.0), (33, 100, 128, 0.3)])
@needs_gpu
def test_cuda_fewer_queries_than_keys_kv_cache(dtype, Tq, Tk, D, p):
    """The KV-cache case: queries are the last Tq of Tk positions (masks and dropout rows shifted)."""
    seed = torch.tensor([77], dtype=torch.int64)
    fn = lambda backend: lambda q, k, v: ops.causal_attention(q, k, v, dropout_p=p, seed=seed,  # noqa: E731
                                                                backend=backend)
    check_precision(fn("extension"), fn("reference"), fn("reference"),
                    [crand(2, 3, Tq, D, seed=90), crand(2, 3, Tk, D, seed=91), crand(2, 3, Tk, D, seed=92)], dtype)


@pytest.mark.parametrize("dtype,T", [(torch.float32, 40), (torch.float16, 48), (torch.bfloat16, 64)])
@needs_gpu
def test_cuda_dropout_mask_is_the_reference_mask(dtype, T):   # fp16/bf16 with T = D % 16 == 0: tensor-core kernel
    q = torch.zeros(1, 2, T, T, device="cuda", dtype=dtype)
    v = torch.eye(T, device="cuda", dtype=dtype).expand(1, 2, T, T).contiguous()
    seed = torch.tensor([2024], dtype=torch.int64)
    out, _ = KERNELS.attention_fwd(q, q, v, True, 1.0, 0.4, seed)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device="cuda"))
    keep = dropout_keep_mask(seed, 2, T, T, 0.4, device="cuda").view(1, 2, T, T) & causal
    assert torch.equal(out != 0, keep)


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
@pytest.mark.parametrize("dtype", ["float32", "float16"])              # plain and tensor-core kernels
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@needs_gpu
def test_cuda_attention_kernels_are_sanitizer_clean(tool, dtype):
    code = ("import torch; from gptfast import ops\n"
            f"q, k, v = [torch.randn(1, 2, 70, 80, device='cuda', dtype=torch.{dtype}, requires_grad=True) "
            "for _ in range(3)]\n"
            "ops.causal_attention(q, k, v, dropout_p=0.1, backend='extension').sum().backward()\n"
            "torch.cuda.synchronize()\n")
    result = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=9", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_triton_attention_says_which_head_dims_it_takes():
    with pytest.raises(ValueError, match="head dim D=8 is unsupported by the Triton attention"):
        ops.causal_attention(*(rand(1, 1, 4, 8).float() for _ in range(3)), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitwise repeatability is a GPU property to check")
def test_triton_backward_kernels_are_bitwise_repeatable_on_gpu():
    q, k, v = [t.to(torch.bfloat16) for t in tqkv(2, 12, 1024, 64, seed=70)]
    seed = torch.tensor([5], dtype=torch.int64)
    o, lse = TRITON_KERNELS.attention_fwd(q, k, v, True, 0.125, 0.1, seed)
    do = torch.randn_like(o)
    first = TRITON_KERNELS.attention_bwd(do, q, k, v, o, lse, True, 0.125, 0.1, seed)
    second = TRITON_KERNELS.attention_bwd(do, q, k, v, o, lse, True, 0.125, 0.1, seed)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


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
])
def test_the_cpu_kernel_called_directly_names_a_bad_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_bench_work_by_hand():
    """B=8, H=12, T=1024, D=64: 4 * 96 * 1024^2 * 64 / 2 = 12.88 GFLOP forward, x3.5 with the backward."""
    op = ops.OPS["causal_attention"]
    assert op.bench("attention", (8, 12, 1024, 64)).work(torch.float32, "fwd") == 12_884_901_888
    assert op.bench("attention_dropout", (8, 12, 1024, 64)).work(torch.float32, "fwd+bwd") == 12_884_901_888 * 3.5


def test_bench_simt_row_runs_the_extension_with_the_plain_kernels_switch(monkeypatch):
    """bench_ops' "extension-simt" row (attention's peer): our CUDA attention on its plain kernels."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_ops
    import os

    seen = []
    real = ops.get_backend("extension").causal_attention
    monkeypatch.setattr(ops.get_backend("extension"), "causal_attention",
                        lambda *a, **k: seen.append(os.environ.get("GPTFAST_CUDA_ATTENTION")) or real(*a, **k))
    monkeypatch.delenv("GPTFAST_CUDA_ATTENTION", raising=False)
    op, bench = bench_ops.find_bench("attention", (1, 2, 9, 16))
    rows = bench_ops.run_case(op, bench, "fwd", torch.device("cpu"), torch.float32, 1, ["reference", "extension-simt"])
    assert [r["backend"] for r in rows] == ["reference", "extension-simt"] and rows[1]["max_rel_error"] < 1e-5
    assert seen and set(seen) == {"simt"}                            # the simt row sets the switch...
    assert "GPTFAST_CUDA_ATTENTION" not in os.environ   # ...and puts it back


def test_compare_catches_an_attention_without_its_causal_mask():
    """A backend whose attention forgets the mask fails compare on every case but T = 1 (nothing to mask)."""
    import sys
    import types

    from gptfast.compare.op_check import compare_case
    from gptfast.ops import registry

    m = types.ModuleType("_no_mask")
    m.SHARES_DROPOUT_RNG = False
    m.causal_attention = lambda q, k, v, dropout_p=0.0, scale=None, seed=None: \
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale,
                                                         enable_gqa=k.shape[1] != q.shape[1])
    sys.modules["_no_mask"] = m
    ops.register_backend("no-mask", "_no_mask", "broken")
    try:
        op = ops.OPS["causal_attention"]
        for i, case in enumerate(c for c in op.cases(True) if not c.random):
            rows = compare_case(op, case, ["no-mask"], torch.float32, torch.device("cpu"), seed=i)
            masked = " T1 " not in f" {case.label} "          # one query (the last position) sees every key
            assert all(r.status == ("FAIL" if masked else "PASS") for r in rows), (case.label, rows)
    finally:
        registry._BACKENDS.pop("no-mask")
        registry._loaded.pop("no-mask", None)
        sys.modules.pop("_no_mask")

"""Triton kernels (LayerNorm, GELU) against the float64 reference twins.

Without a CUDA GPU they run in Triton's interpreter on CPU tensors (float32 and float16 only).
"""
import pytest
import torch

triton_ops = pytest.importorskip("gptfast.ops.triton", reason="Triton is not installed",
                                 exc_type=ImportError)

from conftest import check_precision as check  # noqa: E402
from conftest import precision_errors as errors  # noqa: E402
from conftest import interface_case, rel_error  # noqa: E402
from gptfast.ops import reference
from gptfast.ops.attention import reference as attention_reference  # noqa: E402
from gptfast import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = torch.ops.gptfast_triton                 # the kernel ops (same signatures as torch.ops.gptfast's)
TRITON = triton_ops                                # the backend functions (ops.<op>(..., backend="triton") call them)
CPU_DTYPES = [torch.float32, torch.float16]      # the interpreter computes bf16 wrongly


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(DEVICE)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 1023), (9, 1600), (70, 64)])
@pytest.mark.slow
def test_layer_norm_matches_reference(dtype, shape):
    C = shape[-1]
    x, w, b = rand(*shape, seed=1, scale=2.0, shift=3.0), rand(C, seed=2), rand(C, seed=3)
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b)  # noqa: E731
    check(TRITON.layer_norm, torch_ln, reference.layer_norm, [x, w, b], dtype)


def test_layer_norm_noncontiguous_stats_and_deterministic_backward():
    x = rand(40, 24, seed=7).t().float()              # (24, 40), non-contiguous
    w, b = rand(40, seed=8).float(), rand(40, seed=9).float()
    y, mean, rstd = KERNELS.layer_norm_fwd(x, w, b, 1e-5)
    assert rel_error(y, reference.layer_norm(x.double(), w.double(), b.double())) < 1e-5
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (24,)
    dy = rand(24, 40, seed=10).float()
    first = KERNELS.layer_norm_bwd(dy, x, w, mean, rstd)
    second = KERNELS.layer_norm_bwd(dy, x, w, mean, rstd)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1023), (2, 40000)])
@pytest.mark.slow
def test_gelu_matches_reference(dtype, shape):
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check(TRITON.gelu, torch_gelu, reference.gelu, [rand(*shape, seed=13, scale=3.0)], dtype)


def test_opcheck_every_op():
    x, w, b = rand(4, 5, 32, seed=20).float(), rand(32, seed=21).float(), rand(32, seed=22).float()
    y, mean, rstd = KERNELS.layer_norm_fwd(x, w, b, 1e-5)
    g = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(KERNELS.layer_norm_fwd, (g(x), g(w), g(b), 1e-5))
    torch.library.opcheck(KERNELS.layer_norm_bwd, (rand(4, 5, 32, seed=23).float(), x, w, mean, rstd))
    torch.library.opcheck(KERNELS.gelu_fwd, (g(x),))
    torch.library.opcheck(KERNELS.gelu_bwd, (y, x))


def test_what_the_kernels_cannot_do_is_said():
    """Argument checks are the interface's (test_op_contract); the kernels say what they do not support."""
    with pytest.raises(TypeError, match="the Triton GELU supports float32, float16 and bfloat16, got float64"):
        ops.gelu(rand(3), backend="triton")
    with pytest.raises(TypeError, match="the Triton LayerNorm supports"):
        ops.layer_norm(rand(2, 8), rand(8), rand(8), backend="triton")
    with pytest.raises(ValueError, match="head dim D=8 is unsupported by the Triton attention"):
        ops.causal_attention(*(rand(1, 1, 4, 8).float() for _ in range(3)), backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs a GPU: Triton's CPU interpreter computes bf16 wrongly")
def test_bfloat16_on_gpu():
    x, w, b = rand(64, 768, seed=30, shift=1.0), rand(768, seed=31), rand(768, seed=32)
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (768,), w, b)  # noqa: E731
    check(TRITON.layer_norm, torch_ln, reference.layer_norm, [x, w, b], torch.bfloat16)
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check(TRITON.gelu, torch_gelu, reference.gelu, [rand(64, 3072, seed=33)], torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU Triton runs natively (no interpreter): bf16 is "
                                                   "checked by test_bfloat16_on_gpu")
@pytest.mark.parametrize("op", ["layer_norm", "gelu", "attention", "cross_entropy"])
def test_bfloat16_cpu_tensors_are_widened_not_garbage(op):
    """On CPU tensors the interpreter gets bf16 wrong (attention: relative error ~1e8), so the
    backend runs bfloat16 CPU inputs in float32 and rounds back: held to the bf16 rule."""
    check(*interface_case(op, "triton"), torch.bfloat16)


# ----------------------------------------------------------------------------- attention
from gptfast.ops.dropout_rng import dropout_keep_mask  # noqa: E402


def qkv(B, H, T, D, seed=0):
    return [rand(B, H, T, D, seed=seed + i) for i in range(3)]


def sdpa(causal, scale):
    return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 16), (2, 2, 7, 64), (1, 2, 129, 80), (1, 1, 65, 32)])
@pytest.mark.slow
def test_causal_attention_matches_reference(dtype, B, H, T, D):
    check(lambda *a: ops.causal_attention(*a, backend="triton"), sdpa(True, None), reference.causal_attention,
          qkv(B, H, T, D), dtype)


@pytest.mark.parametrize("T", [7, 70])
def test_full_attention_matches_reference(T):
    fn = lambda q, k, v: KERNELS.attention_fwd(q, k, v, False, 0.3, 0.0, torch.zeros(1, dtype=torch.long))[0]  # noqa: E731
    check(fn, sdpa(False, 0.3), lambda q, k, v: attention_reference(q, k, v, causal=False, scale=0.3),
          qkv(2, 1, T, 16, seed=5), torch.float32)


def test_attention_noncontiguous_inputs():
    q, k, v = [rand(2, 37, 3, 16, seed=40 + i).transpose(1, 2).float() for i in range(3)]
    out = ops.causal_attention(q, k, v, backend="triton")
    assert rel_error(out, reference.causal_attention(q.double(), k.double(), v.double())) < 1e-5


@pytest.mark.parametrize("T,causal", [(45, True), (33, False)])
def test_dropout_matches_reference_and_extension(T, causal):
    q, k, v = qkv(2, 3, T, 16, seed=50)
    seed = torch.tensor([987654321987], dtype=torch.int64)
    fn = lambda *a: KERNELS.attention_fwd(*a, causal, 0.25, 0.3, seed)[0]  # noqa: E731
    ref = lambda *a: attention_reference(*a, causal=causal, scale=0.25, dropout_p=0.3, seed=seed)  # noqa: E731
    assert max(errors(fn, ref, [q, k, v], torch.float32)) < 1e-5


@pytest.mark.parametrize("Tq,Tk,p", [(1, 70, 0.0), (5, 9, 0.0), (65, 130, 0.0), (33, 100, 0.3)])
@pytest.mark.slow
def test_fewer_queries_than_keys_with_gradients_and_dropout(Tq, Tk, p):
    """The KV-cache case: queries are the last Tq of Tk positions (masks and dropout rows shifted)."""
    assert kv_cache_errors(2, Tq, Tk, p, seed=90) < 1e-5


def kv_cache_errors(B, Tq, Tk, p, seed):
    """Largest relative error (output and the three gradients) of the Triton causal attention with
    Tq queries at the end of Tk keys, against the float64 reference."""
    q = rand(B, 3 if B > 1 else 2, Tq, 16, seed=seed)
    k, v = (rand(q.shape[0], q.shape[1], Tk, 16, seed=seed + i) for i in (1, 2))
    rng = torch.tensor([seed], dtype=torch.int64)
    fn = lambda *a: ops.causal_attention(*a, dropout_p=p, seed=rng, backend="triton")  # noqa: E731
    ref = lambda *a: reference.causal_attention(*a, dropout_p=p, seed=rng)  # noqa: E731
    return max(errors(fn, ref, [q, k, v], torch.float32))


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("Tq,Tk,p", [(129, 129, 0.0), (33, 100, 0.3)])
@pytest.mark.slow
def test_every_block_shape_splits_masked_from_unmasked_key_blocks_correctly(block_m, block_n, Tq, Tk, p):
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


def test_kernel_drops_bit_for_bit_the_same_weights():
    T = 40   # q = k = 0 and v = identity: output row t is the (dropped) weight row t
    q = torch.zeros(1, 2, T, T, device=DEVICE)
    v = torch.eye(T, device=DEVICE).expand(1, 2, T, T).contiguous()
    seed = torch.tensor([2024], dtype=torch.int64)
    out, _ = KERNELS.attention_fwd(q, q, v, True, 1.0, 0.4, seed)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=DEVICE))
    keep = dropout_keep_mask(seed, 2, T, T, 0.4, device=DEVICE).view(1, 2, T, T) & causal
    assert torch.equal(out != 0, keep)


def test_attention_opcheck():
    q, k, v = [rand(1, 2, 19, 16, seed=120 + i).float() for i in range(3)]
    seed = torch.tensor([42], dtype=torch.int64)
    o, lse = KERNELS.attention_fwd(q, k, v, True, 0.25, 0.1, seed)
    g = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(KERNELS.attention_fwd, (g(q), g(k), g(v), True, 0.25, 0.1, seed))
    torch.library.opcheck(KERNELS.attention_bwd, (rand(1, 2, 19, 16, seed=125).float(), q, k, v, o, lse,
                                                     True, 0.25, 0.1, seed))


# ----------------------------------------------------------------------------- the model
@pytest.mark.slow
def test_short_training_run_matches_reference(verdict_text, gpt2_tokenizer):
    from conftest import training_losses

    ids = torch.tensor(gpt2_tokenizer.encode(verdict_text)[:2000]) % 101
    ref = training_losses("reference", ids, steps=8, batch=2, T=30, context_length=32)
    tri = training_losses("triton", ids, steps=8, batch=2, T=30, context_length=32)
    assert (ref - tri).abs().max() < 1e-4, (ref, tri)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPT-2-shape attention in all dtypes needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_gpt2_shapes_on_gpu(dtype):
    check(lambda *a: ops.causal_attention(*a, backend="triton"), sdpa(True, None), reference.causal_attention,
          qkv(2, 12, 1024, 64, seed=60), dtype, fp32_tol=3e-4)   # fp32 tl.dot uses tf32 on GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPT-2-vocabulary cross-entropy in all dtypes needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_entropy_gpt2_vocab_on_gpu(dtype):
    g = torch.Generator().manual_seed(80)
    logits = (torch.randn(2048, 50304, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    targets = torch.randint(0, 50304, (2048,), generator=g).to(DEVICE)
    targets[::7] = -100
    ce = lambda backend: lambda x: ops.cross_entropy(x, targets, backend=backend)  # noqa: E731
    check(ce("triton"), ce("torch"), ce("reference"), [logits], dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitwise repeatability is a GPU property to check")
def test_backward_kernels_are_bitwise_repeatable_on_gpu():
    q, k, v = [t.to(torch.bfloat16) for t in qkv(2, 12, 1024, 64, seed=70)]
    seed = torch.tensor([5], dtype=torch.int64)
    o, lse = KERNELS.attention_fwd(q, k, v, True, 0.125, 0.1, seed)
    do = torch.randn_like(o)
    first = KERNELS.attention_bwd(do, q, k, v, o, lse, True, 0.125, 0.1, seed)
    second = KERNELS.attention_bwd(do, q, k, v, o, lse, True, 0.125, 0.1, seed)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    x, w = rand(4096, 768, seed=71).to(torch.bfloat16), rand(768, seed=72).to(torch.bfloat16)
    _, mean, rstd = KERNELS.layer_norm_fwd(x, w, w, 1e-5)
    dy = torch.randn_like(x)
    a, b = KERNELS.layer_norm_bwd(dy, x, w, mean, rstd), KERNELS.layer_norm_bwd(dy, x, w, mean, rstd)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=101, context_length=64, emb_dim=64, n_heads=4, n_layers=1,
                               drop_rate=0.0, backend="triton")).to(DEVICE).eval()
    idx = torch.randint(0, 101, (2, 40), device=DEVICE)
    eager = model(idx)
    out = torch.compile(model, fullgraph=True)(idx)
    assert rel_error(out, eager) < (3e-4 if DEVICE == "cuda" else 1e-5)   # tf32 dots on GPU


def test_gptfast_imports_and_reports_when_triton_is_missing():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; sys.modules['triton'] = None\n"          # as if Triton were not installed
            "import gptfast, gptfast.model, gptfast.ops as o\n"
            "print(o.available_backends()['triton'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("unavailable:") and "triton" in result.stdout


def test_gpu_launches_try_only_the_configs_of_their_tile_class():
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

"""The `extension` backend's CUDA kernels (csrc/cuda/) against the float64 reference. GPU only."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need an NVIDIA GPU")

from conftest import ROOT, check_precision, rel_error  # noqa: E402
from gptfast import ops  # noqa: E402
from gptfast.ops import reference  # noqa: E402
from gptfast.ops.dropout_rng import dropout_keep_mask  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = torch.ops.gptfast


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).cuda()


def test_extension_was_built_with_cuda():
    from gptfast.compiled import load_extension

    info = load_extension().build_info()
    assert "cuda" in info["compiled_backends"], f"gptfast._C has no CUDA kernels: {info}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8 * 1024, 768), (3, 5, 1023), (9, 1600), (1, 768)])
def test_layer_norm(dtype, shape):
    C = shape[-1]
    torch_ln = lambda x, w, b: torch.nn.functional.layer_norm(x, (C,), w, b)  # noqa: E731
    check_precision(lambda *a: ops.layer_norm(*a, backend="extension"), torch_ln, reference.layer_norm,
                    [rand(*shape, seed=1, scale=2.0, shift=1.0), rand(C, seed=2), rand(C, seed=3)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8 * 1024, 3072), (7,), (3, 1001)])
def test_gelu(dtype, shape):
    torch_gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    check_precision(lambda a: ops.gelu(a, backend="extension"), torch_gelu, reference.gelu,
                    [rand(*shape, seed=4, scale=3.0)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D", [(4, 12, 1024, 64), (1, 2, 1, 16), (2, 3, 7, 64), (1, 2, 129, 80),
                                     (1, 1, 1000, 128)])
def test_causal_attention(dtype, B, H, T, D):
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    check_precision(lambda *a: ops.causal_attention(*a, backend="extension"), sdpa, reference.causal_attention,
                    [rand(B, H, T, D, seed=5 + i) for i in range(3)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D", [(2, 12, 256, 64), (1, 2, 129, 80), (1, 1, 7, 128)])
def test_plain_and_tensor_core_attention_both_meet_the_bar(dtype, B, H, T, D, monkeypatch):
    """fp16/bf16 with D % 16 == 0 run on the WMMA kernels (attention_tc.cu); the plain fp32-math
    kernels (attention.cu) stay reachable with GPTFAST_CUDA_ATTENTION=simt: both pass the rule."""
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    inputs = [rand(B, H, T, D, seed=20 + i) for i in range(3)]
    ext = lambda *a: ops.causal_attention(*a, backend="extension")  # noqa: E731
    check_precision(ext, sdpa, reference.causal_attention, inputs, dtype)
    monkeypatch.setenv("GPTFAST_CUDA_ATTENTION", "simt")
    check_precision(ext, sdpa, reference.causal_attention, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_dropout_matches_the_reference(dtype):
    """Same seed, same mask: outputs and gradients against the float64 reference with dropout."""
    seed = torch.tensor([77], dtype=torch.int64)
    fn = lambda backend: lambda q, k, v: ops.causal_attention(q, k, v, dropout_p=0.2, seed=seed,  # noqa: E731
                                                                backend=backend)
    check_precision(fn("extension"), fn("reference"), fn("reference"), [rand(2, 3, 100, 64, seed=30 + i)
                                                                        for i in range(3)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tq,Tk,D,p", [(1, 70, 64, 0.0), (5, 9, 80, 0.0), (65, 130, 64, 0.0), (33, 100, 128, 0.3)])
def test_fewer_queries_than_keys_kv_cache(dtype, Tq, Tk, D, p):
    """The KV-cache case: queries are the last Tq of Tk positions (masks and dropout rows shifted)."""
    seed = torch.tensor([77], dtype=torch.int64)
    fn = lambda backend: lambda q, k, v: ops.causal_attention(q, k, v, dropout_p=p, seed=seed,  # noqa: E731
                                                                backend=backend)
    check_precision(fn("extension"), fn("reference"), fn("reference"),
                    [rand(2, 3, Tq, D, seed=90), rand(2, 3, Tk, D, seed=91), rand(2, 3, Tk, D, seed=92)], dtype)


def test_generation_with_the_kv_cache_gives_the_same_tokens():
    from gptfast.generate import generate

    model = small_model("extension").eval()
    idx = torch.randint(0, 101, (2, 5), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    plain = generate(model, idx, 70, use_cache=False)                 # 5 + 70 > 64: the window slides too
    assert torch.equal(generate(model, idx, 70, use_cache=True), plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_gpt2_vocab(dtype):
    g = torch.Generator().manual_seed(6)
    targets = torch.randint(0, 50304, (1024,), generator=g).cuda()
    targets[::5] = -100
    ce = lambda backend: lambda x: ops.cross_entropy(x, targets, backend=backend)  # noqa: E731
    check_precision(ce("extension"), ce("torch"), ce("reference"), [rand(1024, 50304, seed=7, scale=2.0)], dtype)


@pytest.mark.parametrize("dtype,T", [(torch.float32, 40), (torch.float16, 48), (torch.bfloat16, 64)])
def test_dropout_mask_is_the_reference_mask(dtype, T):   # fp16/bf16 with T = D % 16 == 0: tensor-core kernel
    q = torch.zeros(1, 2, T, T, device="cuda", dtype=dtype)
    v = torch.eye(T, device="cuda", dtype=dtype).expand(1, 2, T, T).contiguous()
    seed = torch.tensor([2024], dtype=torch.int64)
    out, _ = OPS.attention_fwd(q, q, v, True, 1.0, 0.4, seed)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device="cuda"))
    keep = dropout_keep_mask(seed, 2, T, T, 0.4, device="cuda").view(1, 2, T, T) & causal
    assert torch.equal(out != 0, keep)


def test_opcheck_on_cuda():
    x, w, b = rand(4, 5, 64, seed=8).float(), rand(64, seed=9).float(), rand(64, seed=10).float()
    q, k, v = [rand(2, 2, 33, 32, seed=11 + i).float() for i in range(3)]
    seed = torch.tensor([3], dtype=torch.int64)
    g = lambda t: t.clone().requires_grad_()  # noqa: E731
    torch.library.opcheck(OPS.layer_norm_fwd.default, (g(x), g(w), g(b), 1e-5))
    torch.library.opcheck(OPS.gelu_fwd.default, (g(x),))
    torch.library.opcheck(OPS.attention_fwd.default, (g(q), g(k), g(v), True, 0.2, 0.1, seed))
    torch.library.opcheck(OPS.cross_entropy_fwd.default, (g(x.view(20, 64)), torch.arange(20).cuda(), -100, True))


def small_model(backend, drop_rate=0.0):
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=101, context_length=64, emb_dim=128, n_heads=4, n_layers=2,
                              drop_rate=drop_rate, backend=backend)).cuda()


def test_torch_compile_fullgraph():
    model = small_model("extension").eval()
    idx = torch.randint(0, 101, (2, 64), device="cuda")
    assert rel_error(torch.compile(model, fullgraph=True)(idx), model(idx)) < 1e-5


def test_short_training_run_matches_reference():
    idx = torch.randint(0, 101, (4, 65), generator=torch.Generator().manual_seed(1)).cuda()

    def losses(backend):
        model = small_model(backend, drop_rate=0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        out = []
        for _ in range(10):
            loss = ops.cross_entropy(model(idx[:, :-1]), idx[:, 1:], backend=backend)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return torch.tensor(out)

    assert (losses("reference") - losses("extension")).abs().max() < 1e-4


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
@pytest.mark.parametrize("dtype", ["float32", "float16"])              # plain and tensor-core kernels
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_attention_kernels_are_sanitizer_clean(tool, dtype):
    code = ("import torch; from gptfast import ops\n"
            f"q, k, v = [torch.randn(1, 2, 70, 80, device='cuda', dtype=torch.{dtype}, requires_grad=True) "
            "for _ in range(3)]\n"
            "ops.causal_attention(q, k, v, dropout_p=0.1, backend='extension').sum().backward()\n"
            "torch.cuda.synchronize()\n")
    result = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=9", sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("kind", ["float32", "bf16", "int8"])
@pytest.mark.parametrize("M,K,N", [(1, 768, 50257), (1, 768, 3072), (8, 3072, 768), (3, 100, 9), (16, 64, 7),
                                   (20, 64, 7)])
@pytest.mark.parametrize("backend", ["extension", "triton"])
def test_decoding_linear(backend, M, K, N, kind, x_dtype):
    """The linear layer of decoding (csrc/cuda/linear.cu; gptfast/ops/triton/linear.py) against float64
    on the same quantized weights: 1-16 rows take the kernel, 20 a GEMM; K = 100 the unaligned path."""
    from gptfast.model.quantize import quantize_int8_rows

    x64, w64, b64 = rand(M, K, seed=31), rand(N, K, seed=32) * 0.05, rand(N, seed=33)
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

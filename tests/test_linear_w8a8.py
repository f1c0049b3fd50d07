"""ops.linear_w8a8 (csrc/cpu/linear_w8a8.cpp): every instruction path this CPU runs gives the generic loop's bits
(the sums are exact integers), against the float64 twin at decoding shapes, the activations' rounding as the twin
defines it, rows alone = in a batch, the kernel's refusals. (Odd shapes, strided views, bad inputs, opcheck and
compile through the interface: its cases, test_op_contract.)"""
import pytest
import torch

from conftest import int8_dot_paths_here, rel_error
from gptfast import ops
from gptfast.compiled import set_poison_outputs
from gptfast.ops.linear import weights_of_kind
from gptfast.ops.linear_w8a8 import quantize_rows, reference

ops.get_backend("extension")                  # loads the compiled kernels (torch.ops.gptfast)
kernel = torch.ops.gptfast.linear_w8a8_fwd


@pytest.fixture(autouse=True)
def poisoned_outputs():
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def layer(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, scales = weights_of_kind("int8", torch.randn(N, K, generator=g, dtype=torch.float64) * K ** -0.5)
    return w, scales, torch.randn(N, generator=g) * 0.1


paths_here = int8_dot_paths_here


# (M, K, N): GPT-2's and Qwen3-0.6B's decoding layers at batch 1 and 8, K off every vector width
SHAPES = [(1, 768, 3072), (8, 3072, 768), (8, 1024, 3072), (5, 1000, 129), (16, 33, 100), (3, 7, 17), (1, 1, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}".format(*s))
def test_every_path_here_is_the_generic_loop_to_the_bit(shape):
    M, K, N = shape
    w, scales, b = layer(N, K, seed=K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    paths = paths_here()
    outs = {p: kernel(x, w, scales, b, path=p) for p in paths}
    print(f"paths run here: {paths}")
    for p in paths:
        assert torch.equal(outs[p], outs["generic"]), p
    assert rel_error(outs["generic"], reference(x.double(), w, scales, b)) < 1e-5
    assert torch.equal(kernel(x, w, scales, b), outs[paths[-1]])    # None: the best path here


@pytest.mark.parametrize("shape", [(1, 768, 300), (20, 130, 50), (5, 1000, 129), (3, 7, 17)],
                         ids=lambda s: "M{}_K{}_N{}".format(*s))
def test_the_triton_twin_is_the_cpu_kernel_to_the_bit(shape):
    """The Triton kernel (here in Triton's interpreter) quantizes x to the same q, sums the same exact integers and
    scales them in the same order as the CPU kernel: the same bits (20 rows: two programs along M)."""
    ops.get_backend("triton")                 # loads the Triton kernels (torch.ops.gptfast_triton)
    M, K, N = shape
    w, scales, b = layer(N, K, seed=K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)) * torch.rand(M, 1) * 10
    x[0, 1] = 0.0
    ours = torch.ops.gptfast_triton.linear_w8a8_fwd(x, w, scales, b)
    assert torch.equal(ours, kernel(x, w, scales, b))
    assert torch.equal(torch.ops.gptfast_triton.linear_w8a8_fwd(x, w, scales, None), kernel(x, w, scales, None))


def test_a_path_this_cpu_lacks_is_refused_by_name():
    x, (w, s, b) = torch.randn(2, 64), layer(8, 64)
    missing = [p for p in ("vnni", "avxvnni", "avx2", "amx") if p not in paths_here()]
    for p in missing:
        with pytest.raises(RuntimeError, match=f"path {p} does not run here"):
            kernel(x, w, s, b, path=p)


def test_the_activations_round_as_the_twin_says():
    """x quantized per row: the largest |x| of each row to exactly +-127, halves to even, zeros stay zero; the
    output equals the exact integer products scaled (here with unit weights: sums of q)."""
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5], [0.0, 0.0, 0.0, 0.0], [-254.0, 127.0, 1.0, 0.0]])
    q, sx = quantize_rows(x)
    assert q.tolist() == [[127.0, 0.0, 2.0, -2.0], [0.0] * 4, [-127.0, 64.0, 0.0, 0.0]]   # 63.5 -> 64, 2.5 -> 2
    assert torch.equal(sx.squeeze(1), torch.tensor([1.0, 0.0, 2.0]))
    w = torch.ones(1, 4, dtype=torch.int8)
    y = kernel(x, w, torch.ones(1), None)
    assert torch.equal(y[:, 0], (q.sum(1) * sx.squeeze(1)).float())


def test_a_row_alone_is_the_row_in_a_batch_and_the_zero_row_is_zero():
    w, s, b = layer(300, 768, seed=3)
    x = torch.randn(9, 768, generator=torch.Generator().manual_seed(2))
    x[4] = 0
    batch = kernel(x, w, s, b)
    for m in (0, 4, 8):
        assert torch.equal(kernel(x[m:m + 1], w, s, b), batch[m:m + 1])
    assert torch.equal(batch[4], b)


def test_the_kernel_refuses_what_its_loops_cannot_take():
    x, (w, s, b) = torch.randn(2, 64), layer(8, 64)
    for args, message in [((x.double(), w, s, b), "x: the CPU int8 x int8 linear takes float32"),
                          ((x, w.float(), s, b), "weight must be int8"),
                          ((x, w[:, :5], s, b), r"weight must be int8 \(N, K\) with K = x's last dim \(64\)"),
                          ((x, w, s[:3], b), r"scales must be float32 \(8,\)"),
                          ((x, w, s, b.double()), r"bias must be float32 \(8,\)"),
                          ((torch.randn(1, 70000), torch.ones(2, 70000, dtype=torch.int8), torch.ones(2), None),
                           "K must be at most 65536")]:
        with pytest.raises(RuntimeError, match=message):
            kernel(*args)


def test_its_error_against_float_is_the_activation_rounding():
    """Next to the widen-to-float int8 kernel, the only difference is x's rounding: within ~1% of the outputs' size
    at a decoding shape (a bound, not a target: the quality of a model is measured in NOTES)."""
    w, s, b = layer(3072, 768, seed=5)
    x = torch.randn(8, 768, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        exact = ops.linear_int8(x, w, s, b, backend="extension")
        assert 1e-4 < rel_error(ops.linear_w8a8(x, w, s, b, backend="extension"), exact) < 1e-2


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_a_w8a8_model_decodes_through_it_and_agrees_with_the_textbook(family, monkeypatch):
    """quantize(model, "w8a8"): op by op, every linear layer of a step is one linear_w8a8 call; fused (the whole
    model in one call, test_decode_model) the same tokens; both the reference backend's."""
    import copy

    from gptfast.generate import generate
    from gptfast.model import build_model
    from gptfast.model.config import GPTConfig, LlamaConfig
    from gptfast.model.quantize import quantize

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=101, context_length=24, emb_dim=64, n_heads=4, n_layers=2, backend="extension") \
        if family == "gpt2" else LlamaConfig(vocab_size=101, context_length=24, emb_dim=64, hidden_dim=96, n_heads=4,
                                             n_kv_heads=2, head_dim=16, n_layers=2, backend="extension")
    model = quantize(build_model(cfg), "w8a8")
    calls = []
    real = ops.linear_w8a8
    monkeypatch.setattr(ops, "linear_w8a8", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    op_by_op = generate(model, prompt, max_new_tokens=6, fused_decoding=False)
    per_step = 2 * (4 if family == "gpt2" else 7) + 1             # GPT-2: stacked qkv, out, fc, proj; + the head
    assert len(calls) == 6 * per_step                             # the prefill and 5 one-token steps
    fused = generate(model, prompt, max_new_tokens=6)
    assert len(calls) == 7 * per_step                             # the prefill alone: the steps are one call each
    ref = generate(copy.deepcopy(model).set_backend("reference"), prompt, max_new_tokens=6)
    assert torch.equal(op_by_op, ref) and torch.equal(fused, ref)

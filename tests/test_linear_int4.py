"""ops.linear_int4 (csrc/cpu/linear_int4.cpp) and quantize(model, "int4"): the packing against its definition,
every instruction path this CPU runs against the generic loop and the float64 twin, groups of 32 and 64, rows alone
= in a batch, the kernel's refusals, a 4-bit model's decoding. (Odd shapes, strided views, bad inputs, opcheck and
compile through the interface: its cases, test_op_contract.)"""
import copy
import os

import pytest
import torch

from conftest import int8_dot_paths_here, rel_error
from gptfast import ops
from gptfast.compiled import set_poison_outputs
from gptfast.ops.linear_int4 import pack_int4, reference, unpack_int4

ops.get_backend("extension")                  # loads the compiled kernels (torch.ops.gptfast)
kernel = torch.ops.gptfast.linear_int4_fwd


@pytest.fixture(autouse=True)
def poisoned_outputs():
    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


paths_here = int8_dot_paths_here


@pytest.mark.parametrize("group", [32, 64])
def test_packing_is_what_it_says(group):
    """Groups of `group` along K, symmetric, scale absmax / 7, nibbles q + 8, low nibbles weights 0..31 of each 64;
    unpacking gives back each weight within half a step, and the largest of a group exactly."""
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    packed, scales = pack_int4(w, group)
    assert packed.shape == (5, 64) and packed.dtype == torch.uint8 and scales.shape == (5, 128 // group)
    back = unpack_int4(packed, scales, 100, torch.float64)
    step = scales.double().repeat_interleave(group, 1)[:, :100]
    assert ((back - w).abs() <= step / 2 * (1 + 1e-6)).all()
    first = w[0, :group] if group <= 100 else w[0]
    assert torch.isclose(back[0, first.abs().argmax()].abs(), first.abs().max().double(), rtol=1e-6)
    lo = packed[1, 3] & 0x0F                                     # weight 3 of row 1: the low nibble of byte 3
    assert float(lo) - 8 == torch.round(w[1, 3] / scales[1, 0].double()).item()
    assert (packed[:, 36:] >> 4 == 8).all()          # weights 100..127 (high nibbles of bytes 36..63): padding, 0


SHAPES = [(1, 768, 3072), (8, 3072, 768), (8, 1024, 3072), (5, 1000, 129), (16, 33, 100), (3, 7, 17)]


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}".format(*s))
def test_every_path_here_against_the_generic_loop_and_the_twin(shape, group):
    M, K, N = shape
    g = torch.Generator().manual_seed(K + group)
    w, scales = pack_int4(torch.randn(N, K, generator=g) * K ** -0.5, group)
    b = torch.randn(N, generator=g) * 0.1
    x = torch.randn(M, K, generator=g)
    ref = reference(x.double(), w, scales, b)
    outs = {p: kernel(x, w, scales, b, path=p) for p in paths_here()}
    print(f"paths run here: {list(outs)}")
    for p, y in outs.items():
        assert rel_error(y, ref) < 1e-5, p
        assert rel_error(y, outs["generic"]) < 1e-6, p
    if "avxvnni" in outs:                                          # AVX2's sums and float steps, one instruction each
        assert torch.equal(outs["avxvnni"], outs["avx2"])
    assert torch.equal(kernel(x, w, scales, b), outs[paths_here()[-1]])


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("shape", [(1, 768, 300), (20, 130, 50), (5, 1000, 129), (3, 7, 17)],
                         ids=lambda s: "M{}_K{}_N{}".format(*s))
def test_the_triton_twin_against_the_cpu_kernel_and_the_twin(shape, group):
    """The Triton kernel (here in Triton's interpreter): the same exact group sums as the CPU kernel, summed in float
    in another order (1e-6 of each other), 1e-5 of the float64 twin; 20 rows: two programs along M."""
    ops.get_backend("triton")                 # loads the Triton kernels (torch.ops.gptfast_triton)
    M, K, N = shape
    g = torch.Generator().manual_seed(K + group + 1)
    w, scales = pack_int4(torch.randn(N, K, generator=g) * K ** -0.5, group)
    b = torch.randn(N, generator=g) * 0.1
    x = torch.randn(M, K, generator=g)
    ours = torch.ops.gptfast_triton.linear_int4_fwd(x, w, scales, b)
    assert rel_error(ours, kernel(x, w, scales, b)) < 1e-6
    assert rel_error(ours, reference(x.double(), w, scales, b)) < 1e-5
    assert rel_error(torch.ops.gptfast_triton.linear_int4_fwd(x, w, scales, None), reference(x.double(), w, scales)) < 1e-5


GPTFAST_PATH_PROBE = """
import torch
from gptfast import ops
ops.get_backend("extension")
from gptfast.ops.linear_int4 import pack_int4
g = torch.Generator().manual_seed(0)
w, s = pack_int4(torch.randn(64, 768, generator=g), 64)
x = torch.randn(3, 768, generator=g)
k = torch.ops.gptfast.linear_int4_fwd
print(sorted(p for p in {paths} if torch.equal(k(x, w, s, None), k(x, w, s, None, path=p))))
"""


def test_the_default_path_can_be_named_in_the_environment():
    """GPTFAST_INT8_DOT_PATH=avx2 makes the kernels (here linear_int4 without a path) take the AVX2 path on a CPU
    with better ones (groups of 64: vnni's float sums differ in the last bits, so the bits tell the path); a name
    that does not run here is an error naming the ones that do."""
    import subprocess
    import sys

    paths = paths_here()
    probe = GPTFAST_PATH_PROBE.format(paths=paths)
    run = lambda value: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,  # noqa: E731
                                       env={**os.environ, "GPTFAST_INT8_DOT_PATH": value})
    if "avx2" in paths:
        same = eval(run("avx2").stdout.strip())                   # the paths whose bits the default run gives
        assert "avx2" in same and "vnni" not in same and "generic" not in same, same
    bad = run("sse9")
    assert bad.returncode != 0 and "GPTFAST_INT8_DOT_PATH=sse9 does not run here" in bad.stderr


def test_a_row_alone_is_the_row_in_a_batch():
    w, s = pack_int4(torch.randn(300, 768, generator=torch.Generator().manual_seed(3)) * 0.03)
    x = torch.randn(9, 768, generator=torch.Generator().manual_seed(2))
    batch = kernel(x, w, s, None)
    for m in (0, 4, 8):
        assert torch.equal(kernel(x[m:m + 1], w, s, None), batch[m:m + 1])


def test_the_kernel_refuses_what_its_loops_cannot_take():
    w, s = pack_int4(torch.randn(8, 64))
    x = torch.randn(2, 64)
    for args, message in [((x.double(), w, s, None), "x: the CPU 4-bit linear takes float32"),
                          ((x, w[:, :16].contiguous(), s, None), r"weight must be uint8 \(N, Kp / 2\)"),
                          ((x, w, s[:, :1].repeat(1, 3), None), "scales must be float32"),
                          ((x, w, s, torch.ones(3)), r"bias must be float32 \(8,\)")]:
        with pytest.raises(RuntimeError, match=message):
            kernel(*args)
    missing = [p for p in ("vnni", "avxvnni", "avx2") if p not in paths_here()]
    for p in missing:
        with pytest.raises(RuntimeError, match=f"path {p} does not run here"):
            kernel(x, w, s, None, path=p)


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
@pytest.mark.parametrize("mode", ["int4", "int4-g64"])
def test_a_4bit_model_decodes_and_agrees_with_the_textbook(family, mode):
    from gptfast.generate import generate
    from gptfast.model import build_model
    from gptfast.model.config import GPTConfig, LlamaConfig
    from gptfast.model.quantize import WeightOnlyLinear, quantize

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=101, context_length=24, emb_dim=64, n_heads=4, n_layers=2, backend="extension") \
        if family == "gpt2" else LlamaConfig(vocab_size=101, context_length=24, emb_dim=64, hidden_dim=96, n_heads=4,
                                             n_kv_heads=2, head_dim=16, n_layers=2, backend="extension")
    ref_model = build_model(cfg).eval()
    model = quantize(copy.deepcopy(ref_model), mode)
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    assert all(m.mode == (mode if m is not model.out_head else "w8a8") for m in layers)
    assert model.out_head.weight.dtype == torch.int8                # the LM head stays 8-bit
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, max_new_tokens=6)
    ref = generate(copy.deepcopy(model).set_backend("reference"), prompt, max_new_tokens=6)
    assert torch.equal(out, ref)
    with torch.no_grad():
        err = rel_error(model(prompt), ref_model(prompt))
    assert 1e-3 < err < 0.2, err                                 # 4 bits: close, not equal

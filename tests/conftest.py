"""Shared test set-up: the data shipped in the package, a generated larger corpus, deterministic
torch, small helpers. Nothing here reads outside the repository or needs the network."""
from __future__ import annotations

import itertools
import os
import pathlib
import random
import re
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Without a GPU, Triton kernels run in its interpreter; the switch must be set before anything
# (transformers, say) imports triton.language, or its own @triton.jit helpers are not interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def verdict_path() -> pathlib.Path:
    """The corpus shipped in the package (the default of `scripts/train.py`)."""
    from gptfast.data import VERDICT_PATH

    return pathlib.Path(VERDICT_PATH)


@pytest.fixture(scope="session")
def verdict_text() -> str:
    return verdict_path().read_text(encoding="utf-8")


def generated_corpus(n_chars: int, seed: int = 0) -> str:
    """A deterministic English-like corpus of about `n_chars` characters for tests that need more text
    than the 20 KB verdict: the verdict's words drawn with their own frequencies, in sentences, speeches
    under upper-case speaker names, numbers, contractions, runs of blanks and some non-ASCII words."""
    words = re.findall(r"[A-Za-z]+", verdict_path().read_text(encoding="utf-8"))
    vocab = sorted(set(words))
    counts = {w: 0 for w in vocab}
    for w in words:
        counts[w] += 1
    cum_weights = list(itertools.accumulate(counts[w] for w in vocab))
    rng = random.Random(seed)
    foreign = ["naïve", "café", "Zürich", "façade", "œuvre", "Ångström", "東京", "Москва", "αβγ", "😀", "—"]
    speakers = ["GISBURN", "MRS. GISBURN", "RICKHAM", "STROUD", "FIRST CITIZEN"]
    out, size = [], 0
    while size < n_chars:
        lines = []
        if rng.random() < 0.3:
            lines.append(rng.choice(speakers) + ":")
        for _ in range(rng.randint(1, 4)):
            sentence = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(3, 18))
            for i in range(len(sentence)):
                r = rng.random()
                if r < 0.02:
                    sentence[i] = rng.choice(foreign)
                elif r < 0.04:
                    sentence[i] = str(rng.randint(0, 99999))
                elif r < 0.07:
                    sentence[i] += rng.choice(["'s", "'ll", "'ve", "'t", ",", ";", " -", "  "])
            text = " ".join(sentence)
            lines.append(text[0].upper() + text[1:] + rng.choice([".", ".", "?", "!", "...", ":"]))
        block = "\n".join(lines) + "\n\n"
        out.append(block)
        size += len(block)
    return "".join(out)[:n_chars]


@pytest.fixture(scope="session")
def large_text() -> str:
    """About a megabyte of generated text (the size of tiny Shakespeare)."""
    return generated_corpus(1_100_000)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from gptfast.tokenizer import get_tokenizer

    return get_tokenizer("gpt2")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64 (the absolute error ‖out‖ when ref is exactly 0)."""
    out, ref = out.double(), ref.double()
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def int8_dot_paths_here() -> list[str]:
    """The integer-dot-product paths (csrc/cpu/int8_paths.h) this build and CPU run, best last - selected by the
    CPU's flags, never skipped (generic runs everywhere): the tests of linear_w8a8 and linear_int4 run each one."""
    from gptfast import ops
    from gptfast.compiled import cpu_flags

    flags = cpu_flags() or set()
    isa = ops.get_backend("extension").build_info()["cpu_isa"]
    vector = isa in ("avx2", "avx512")
    return ["generic"] + (["avx2"] if vector else []) + (["avxvnni"] if vector and "avx_vnni" in flags else []) + \
        (["vnni"] if isa == "avx512" and "avx512_vnni" in flags else [])


def precision_errors(fn, ref_fn, inputs64, dtype, seed=1):
    """Relative errors of fn at `dtype` vs ref_fn in float64: [output, *grads]."""
    ref_in = [t.clone().requires_grad_() for t in inputs64]
    ref = ref_fn(*ref_in)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ins = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    out = fn(*ins)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, ins, dout.to(dtype))
    return [rel_error(out, ref)] + [rel_error(g, rg) for g, rg in zip(grads, ref_grads)]


def check_precision(fn, torch_fn, ref_fn, inputs64, dtype, fp32_tol=1e-5):
    errs = precision_errors(fn, ref_fn, inputs64, dtype)
    if dtype == torch.float32:
        assert max(errs) < fp32_tol, errs
    else:  # half precision: absolute bar, and no worse than 2x PyTorch's own at this precision
        baseline = precision_errors(torch_fn, ref_fn, inputs64, dtype)
        assert max(errs) < 1e-2, errs
        assert all(e <= 2 * b + 1e-6 for e, b in zip(errs, baseline)), (errs, baseline)


def training_losses(backend: str, ids: torch.Tensor, steps: int, batch: int, T: int, context_length: int,
                    drop_rate: float = 0.1) -> torch.Tensor:
    """Losses of `steps` AdamW steps of a small model on consecutive windows of `ids` (vocab 101):
    the same seeds for every backend, so backends that compute the same function agree."""
    from gptfast.model import GPTConfig, GPTModel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=101, context_length=context_length, emb_dim=64, n_heads=4, n_layers=2,
                               drop_rate=drop_rate, backend=backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)                                 # the same dropout draws for every backend
    out = []
    for step in range(steps):
        x = ids[step * T: step * T + batch * T].view(batch, T)
        y = ids[step * T + 1: step * T + batch * T + 1].view(batch, T)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return torch.tensor(out)


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # Triton on CPU tensors: its interpreter
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need an NVIDIA GPU")


def randn64(*shape, dtype=torch.float64, seed=0, scale=1.0, shift=0.0, device="cpu"):
    """Normal values drawn in float64 from `seed`, then cast: the same numbers whatever the dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def run_with_grads(fn, inputs, seed=0):
    """Output and input gradients for a fresh random upstream gradient (the same values at every dtype)."""
    out = fn(*inputs)
    dout = randn64(*out.shape, seed=seed).to(out.dtype)
    return out, torch.autograd.grad(out, inputs, dout)


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0, shift=0.0):
    """randn64 on the CPU (the extension's and the textbook's tests)."""
    return randn64(*shape, dtype=dtype, seed=seed, scale=scale, shift=shift)


def trand(*shape, seed=0, scale=1.0, shift=0.0):
    """float64 values where Triton runs (a GPU, or CPU tensors for its interpreter)."""
    return randn64(*shape, seed=seed, scale=scale, shift=shift, device=TRITON_DEVICE)


def crand(*shape, seed=0, scale=1.0, shift=0.0):
    """float64 values on the GPU (the CUDA kernels' tests)."""
    return randn64(*shape, seed=seed, scale=scale, shift=shift, device="cuda")


@pytest.fixture(autouse=True, scope="session")
def kernel_contracts():
    """The compiled backends' Python side (fake kernels, autograd formulas) registered before any test calls a kernel
    op (torch.ops.gptfast.*) directly - a test run alone must not depend on an earlier test having loaded it."""
    from gptfast import ops

    for name in ("extension", "triton"):
        try:
            ops.get_backend(name)
        except ops.BackendError:
            pass                         # unavailable here: the tests that need it say so themselves
    yield


@pytest.fixture
def poisoned_outputs():
    """Kernel outputs start as NaN, so any element a kernel fails to write fails the test."""
    from gptfast.compiled import set_poison_outputs

    set_poison_outputs(True)
    yield
    set_poison_outputs(False)


def compare_to_reference(fn, ref_fn, inputs64, dtype, tol, seed=1):
    """Run fn on `inputs64` cast to `dtype` and ref_fn in float64; outputs and gradients within `tol`."""
    ref_in = [t.clone().requires_grad_() for t in inputs64]
    ref = ref_fn(*ref_in)
    dout = randn64(*ref.shape, seed=seed)
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ins = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    out = fn(*ins)
    assert out.dtype == dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, ins, dout.to(dtype))
    errs = [rel_error(out, ref)] + [rel_error(g, rg) for g, rg in zip(grads, ref_grads)]
    assert max(errs) < tol, f"relative errors (out, grads...) {errs}"
    assert all(torch.isfinite(t).all() for t in (out, *grads))


def wait_for_step(proc, out, timeout=120):
    """Block until the training run writing to folder `out` has logged an optimizer step; fail if
    the process ends first."""
    deadline = time.time() + timeout
    metrics = pathlib.Path(out) / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"event": "step"' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"the run logged no step (exit status {proc.poll()})")

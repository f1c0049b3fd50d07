"""The LM head fused with the loss (ops.linear_cross_entropy) against the float64 textbook."""
import json

import pytest
import torch

from conftest import precision_errors, rel_error
from gptfast import ops
from gptfast.model import GPTConfig, GPTModel
from gptfast.ops import reference

FUSED = ["extension", "triton"]


def case(N, V, C=24, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=torch.float64)
    weight = torch.randn(V, C, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        targets[i] = -100
    return hidden, weight, targets


def errors_vs_reference(backend, hidden, weight, targets, dtype, chunk_rows):
    """Relative errors of loss, d hidden, d weight against float64 reference."""
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference.linear_cross_entropy(h64, w64, targets)
    ref_gh, ref_gw = torch.autograd.grad(ref, (h64, w64))
    h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    loss = ops.linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert loss.dim() == 0 and gh.dtype == dtype and gw.dtype == dtype
    return [rel_error(loss, ref), rel_error(gh, ref_gh), rel_error(gw, ref_gw)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("N,V,chunk", [(1, 50, 16), (7, 1000, 3), (1000, 257, 64), (33, 1003, 32)])
@pytest.mark.slow
def test_loss_and_both_gradients_match_the_reference(backend, N, V, chunk):
    """Odd N, V not a multiple of anything, chunks that do not divide N; some targets ignored."""
    hidden, weight, targets = case(N, V, ignored=[0] if N > 1 else [])
    dtypes = [torch.float32] + ([torch.float64] if backend == "extension" else [])
    for dtype in dtypes:
        errs = errors_vs_reference(backend, hidden, weight, targets, dtype, chunk)
        assert max(errs) < (1e-12 if dtype == torch.float64 else 1e-5), (dtype, errs)


@pytest.mark.parametrize("backend", FUSED + ["torch"])
def test_all_ignored_gives_nan_like_pytorch_and_ignored_rows_get_no_gradient(backend):
    hidden, weight, targets = case(6, 40, ignored=range(6))
    loss = ops.linear_cross_entropy(hidden.float(), weight.float(), targets, chunk_rows=4, backend=backend)
    assert torch.isnan(loss) and torch.isnan(torch.nn.functional.cross_entropy(hidden.float() @ weight.float().t(),
                                                                              targets))
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()    # ... with a zero gradient, as torch
    (ops.linear_cross_entropy(h, w, targets, chunk_rows=4, backend=backend).nan_to_num() * 0.0).backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    hidden, weight, targets = case(6, 40, ignored=[1, 4])
    h = hidden.float().requires_grad_()
    ops.linear_cross_entropy(h, weight.float(), targets, chunk_rows=4, backend=backend).backward()
    assert h.grad[1].abs().max() == 0 and h.grad[4].abs().max() == 0 and h.grad[0].abs().max() > 0


@pytest.mark.parametrize("backend", FUSED)
def test_half_precision_follows_the_project_rule(backend):
    """float16 inputs: loss and lse in float32; errors under 1e-2 and within 2x PyTorch's own."""
    hidden, weight, targets = case(40, 300, C=32, ignored=[3])

    def fused(h, w):
        return ops.linear_cross_entropy(h, w, targets, chunk_rows=16, backend=backend).to(h.dtype)

    def torch_way(h, w):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), targets).to(h.dtype)

    errs = precision_errors(fused, lambda h, w: reference.linear_cross_entropy(h, w, targets), [hidden, weight],
                            torch.float16)
    base = precision_errors(torch_way, lambda h, w: reference.linear_cross_entropy(h, w, targets), [hidden, weight],
                            torch.float16)
    assert max(errs) < 1e-2 and all(e <= 2 * b + 1e-6 for e, b in zip(errs, base)), (errs, base)


def test_bfloat16_autocast_runs_the_products_in_bf16_and_the_loss_in_float32():
    hidden, weight, targets = case(24, 200, C=32)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(h, w, targets, backend="extension")
        torch_loss = ops.linear_cross_entropy(h, w, targets, backend="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref = reference.linear_cross_entropy(hidden, weight, targets)
    assert rel_error(loss, ref) < 1e-2 and rel_error(loss, ref) <= 2 * rel_error(torch_loss, ref) + 1e-6


@pytest.mark.parametrize("backend", ["extension", "torch"])
def test_the_model_fuses_the_head_with_tied_and_padded_weights(backend):
    """GPTModel(idx, targets): the same loss and every parameter gradient as the reference model's two
    steps; with tied embeddings the shared matrix gets both contributions, with a padded vocabulary
    the padded rows are part of the softmax exactly as in the reference."""
    for kw in ({"tie_embeddings": True}, {"vocab_multiple": 64}):
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                        backend="reference", **kw)
        ref = GPTModel(cfg).double()
        fused = GPTModel(cfg).double()
        fused.load_state_dict(ref.state_dict())
        fused.set_backend(backend)
        idx = torch.randint(0, 101, (2, 16))
        targets = torch.randint(0, 101, (2, 16))
        ref_loss, fused_loss = ref(idx, targets), fused(idx, targets)
        ref_loss.backward()
        fused_loss.backward()
        assert rel_error(fused_loss, ref_loss) < 1e-12
        for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
            assert rel_error(q.grad, p.grad) < 1e-10, (kw, name)
        if kw.get("tie_embeddings"):
            assert fused.tok_emb.weight is fused.out_head.weight


def test_chunk_size_comes_from_a_memory_budget(monkeypatch):
    assert ops.linear_cross_entropy_chunk_rows(8192, 50257) == 333      # 64 MiB of float32 logits
    assert ops.linear_cross_entropy_chunk_rows(100, 50257) == 100        # never more than N
    assert ops.linear_cross_entropy_chunk_rows(8192, 50257, budget_mb=1) == 16   # GEMM-friendly floor
    monkeypatch.setenv("GPTFAST_LCE_BUDGET_MB", "16")
    assert ops.linear_cross_entropy_chunk_rows(8192, 50257) == 83


def test_bad_input_names_the_argument():
    hidden, weight, targets = case(5, 20)
    with pytest.raises(ValueError, match="weight \\(V, C\\) with the same C"):
        ops.linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(TypeError, match="targets must be an int64"):
        ops.linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="outside \\[0, 20\\)"):
        ops.linear_cross_entropy(hidden, weight, targets + 20)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but hidden has torch.float64"):
        ops.linear_cross_entropy(hidden, weight.float(), targets)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        ops.linear_cross_entropy(hidden, weight, targets, chunk_rows=0)


def test_opcheck():
    import gptfast.ops.triton  # noqa: F401 (registers the kernel ops)
    triton_fwd = torch.ops.gptfast_triton.linear_cross_entropy_fwd

    ops.get_backend("extension")                     # loads gptfast._C, which defines torch.ops.gptfast.*
    hidden, weight, targets = case(9, 30)
    for op, dtype in ((torch.ops.gptfast.linear_cross_entropy_fwd.default, torch.float64), (triton_fwd, torch.float32)):
        args = (hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets, -100, 4, True)
        torch.library.opcheck(op, args)


@pytest.mark.slow
def test_compiled_model_with_targets_matches_eager():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                               backend="extension"))
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    eager = model(idx, targets)
    compiled = torch.compile(model, fullgraph=True)(idx, targets)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def test_training_losses_match_the_unfused_path(tmp_path, verdict_text):
    """A short training run on the fused path gives the reference's (unfused) step losses."""
    from gptfast.training import TrainSettings, run_training

    data = tmp_path / "v.txt"
    data.write_text(verdict_text)

    def losses(backend):
        out = tmp_path / backend
        run_training(TrainSettings(data=str(data), preset="tiny", dtype="float32", epochs=1, batch_size=4, context_length=32,
                                   max_steps=8, eval_freq=100, eval_iter=1, out=str(out), backend=backend,
                                   progress=False), echo=lambda *_: None)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([r["loss"] for r in rows if r["event"] == "step"])

    fused, unfused = losses("extension"), losses("reference")
    assert len(fused) == 8 and (fused - unfused).abs().max() < 1e-4



def test_a_second_backward_through_the_same_forward_gives_the_same_gradients():
    hidden, weight, targets = case(8, 30)
    h = hidden.requires_grad_()
    loss = ops.linear_cross_entropy(h, weight, targets, backend="extension")
    first = torch.autograd.grad(loss, h, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(loss, h)[0], first)

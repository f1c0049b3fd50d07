"""Weight-only quantization (gptfast.quantize): the int8 rows, the quantized model's structure, its
quality on a model trained here, saving and loading, and that it cannot be trained."""
import subprocess
import sys

import pytest
import torch

import gptfast
from conftest import ROOT, rel_error
from gptfast.generate import generate
from gptfast.model import GPTConfig, GPTModel, quantize
from gptfast.model.quantize import QuantizedEmbedding, WeightOnlyLinear, quantize_int8_rows


def tiny(tie=False, backend="extension", **kw):
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=300, context_length=32, emb_dim=48, n_heads=4, n_layers=2, qkv_bias=True,
                              tie_embeddings=tie, drop_rate=0.0, backend=backend, **kw))


def clone(model):
    import copy

    return copy.deepcopy(model)


def test_int8_rows_are_symmetric_per_row():
    w = torch.randn(50, 77, dtype=torch.float64) * torch.rand(50, 1, dtype=torch.float64)
    w[3] = 0.0                                                    # an all-zero row: no division by zero
    q, s = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (50,)
    assert q.abs().max() == 127 and int(q.min()) >= -127
    assert torch.equal(q[3], torch.zeros(77, dtype=torch.int8)) and s[3] == 1.0
    rows = [i for i in range(50) if i != 3]
    assert torch.allclose(s[rows].double(), w[rows].abs().amax(1) / 127, rtol=1e-6)
    err = (q.double() * s.double().unsqueeze(1) - w).abs()
    assert (err <= s.double().unsqueeze(1) / 2 * (1 + 1e-5)).all()         # rounding: at most half a step


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["int8", "bf16", "w8a8"])
def test_structure_of_a_quantized_model(tie, mode):
    model = quantize(tiny(tie), mode)
    assert model.quantization == mode and not model.training
    wdtype = torch.bfloat16 if mode == "bf16" else torch.int8
    for block in model.trf_blocks:
        att = block.att
        assert isinstance(att.W_qkv, WeightOnlyLinear) and att.W_qkv.weight.shape == (3 * 48, 48)
        assert not hasattr(att, "W_query")
        for layer in (att.W_qkv, att.out_proj, block.ff.fc, block.ff.proj):
            assert isinstance(layer, WeightOnlyLinear) and layer.weight.dtype == wdtype
            assert (layer.scales is not None) == (mode != "bf16") and layer.bias.dtype == torch.float32
            assert layer.mode == mode
    assert isinstance(model.out_head, WeightOnlyLinear) and model.out_head.weight.dtype == wdtype
    assert isinstance(model.tok_emb, QuantizedEmbedding) == tie
    # nothing float32 of the size of a weight matrix is left: the parameters are LayerNorms, positions
    # and (untied) the token embedding
    big = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert big == ({"pos_emb.weight"} if tie else {"pos_emb.weight", "tok_emb.weight"})
    assert not any(p.requires_grad for p in model.parameters())
    assert gptfast.quantize is quantize                         # the package-level name


@pytest.mark.parametrize("tie", [False, True])
def test_quantized_logits_are_close_and_none_is_the_identity(tie):
    ref = tiny(tie)
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        want = ref(idx)
        assert torch.equal(quantize(clone(ref), "none")(idx), want)
        errors = {mode: rel_error(quantize(clone(ref), mode)(idx), want) for mode in ("bf16", "int8", "w8a8")}
    assert errors["bf16"] < 1e-2 and errors["int8"] < 3e-2 and errors["w8a8"] < 5e-2, errors
    assert errors["bf16"] < errors["int8"] < errors["w8a8"], errors


def test_quantized_layers_compute_the_dequantized_weights_exactly():
    """Each quantized layer against the float64 linear layer of its own dequantized weights."""
    model = quantize(tiny(), "int8")
    x = torch.randn(3, 48, dtype=torch.float64)
    for layer in (model.trf_blocks[0].att.W_qkv, model.out_head):
        with torch.no_grad():
            out = layer(x.float())
        want = x @ layer.dequantized_weight(torch.float64).t() + (layer.bias.double() if layer.bias is not None else 0)
        assert rel_error(out, want) < 1e-5


def test_bad_calls():
    with pytest.raises(ValueError, match="unknown quantization 'int3'; choose one of: none, bf16, int8, w8a8, int4"):
        quantize(tiny(), "int3")
    model = quantize(tiny(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "bf16")
    with pytest.raises(TypeError, match="takes a gptfast GPTModel"):
        quantize(torch.nn.Linear(3, 3), "int8")


def test_training_a_quantized_model_is_a_clear_error():
    model = quantize(tiny(), "int8")
    idx = torch.randint(0, 300, (2, 8))
    model.train()
    with pytest.raises(RuntimeError, match=r"quantized \(int8\): it is for inference only"):
        model(idx, idx)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(idx, idx))                   # an evaluation loss is fine


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile cache before and after: GPTModel.forward compiled for every backend here
    must not use up the recompilation budget (8 per function) of the compile tests that follow."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["extension", "torch", "reference"])
@pytest.mark.slow
def test_compiled_quantized_model(backend, fresh_dynamo):
    model = quantize(tiny(backend=backend), "int8")
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        eager = model(idx)
        compiled = torch.compile(model, fullgraph=True)(idx)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- a model trained here
def train_on(ids: torch.Tensor, model, steps: int, batch: int, T: int):
    """`model` trained with AdamW for `steps` steps of `batch` random windows of T tokens of ids; in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - T - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + T] for s in start])
        y = torch.stack([ids[s + 1:s + T + 1] for s in start])
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(gpt2_tokenizer, verdict_text):
    """A tied (GPT-2-layout) model trained for 150 steps on the first 90% of The Verdict; the rest validates."""
    ids = torch.tensor(gpt2_tokenizer.encode(verdict_text))
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    torch.manual_seed(0)
    model = train_on(train, GPTModel(GPTConfig(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                                               tie_embeddings=True, backend="extension")), steps=150, batch=8, T=64)
    vx = torch.stack([val[i:i + 64] for i in range(0, len(val) - 65, 32)])
    vy = torch.stack([val[i + 1:i + 65] for i in range(0, len(val) - 65, 32)])
    return model, (vx, vy)


@pytest.mark.slow
def test_quality_on_a_trained_model(trained, gpt2_tokenizer):
    model, (vx, vy) = trained
    prompt = torch.tensor([gpt2_tokenizer.encode("Every effort moves you")])
    with torch.no_grad():
        loss = model(vx, vy).item()
        logits = model(vx[:2])
        tokens = generate(model, prompt, 50)
    assert loss < 7.0                                             # it learned something (ln 50257 = 10.8)
    report = {}
    for mode in ("bf16", "int8", "w8a8", "int4", "int4-g64"):
        q = quantize(clone(model), mode)
        with torch.no_grad():
            q_loss = q(vx, vy).item()
            q_tokens = generate(q, prompt, 50)
            report[mode] = {"logits_rel_error": rel_error(q(vx[:2]), logits),
                            "val_loss_change": abs(q_loss - loss) / loss,
                            "greedy_agreement": float((q_tokens == tokens)[0, prompt.shape[1]:].cumprod(0).float().mean())}
    print(f"\nquantization quality (val loss {loss:.4f}): {report}")
    assert report["bf16"]["val_loss_change"] <= 1e-3 and report["int8"]["val_loss_change"] <= 1e-2, report
    assert report["w8a8"]["val_loss_change"] <= 3e-2, report                 # the activations' rounding on top
    assert report["int4"]["val_loss_change"] <= 3e-2 and report["int4-g64"]["val_loss_change"] <= 3e-2, report
    assert report["bf16"]["greedy_agreement"] == 1.0, report   # 50 greedy tokens identical
    assert report["bf16"]["logits_rel_error"] < 5e-3 and report["int8"]["logits_rel_error"] < 3e-2, report


@pytest.fixture(scope="module")
def trained_on_more(large_text):
    """A byte-level model (its vocabulary: the 256 byte values) trained for 400 steps on the first 90% of ~1.1 MB of
    generated English-like text - about 25x The Verdict's tokens, and wider layers (C 128, F 512); the rest
    validates."""
    ids = torch.tensor(list(large_text.encode("utf-8")))
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    torch.manual_seed(0)
    model = train_on(train, GPTModel(GPTConfig(vocab_size=256, context_length=128, emb_dim=128, n_heads=4, n_layers=2,
                                               drop_rate=0.0, tie_embeddings=True, backend="extension")),
                     steps=400, batch=16, T=128)
    starts = range(0, len(val) - 129, len(val) // 64)
    return model, (torch.stack([val[i:i + 128] for i in starts]), torch.stack([val[i + 1:i + 129] for i in starts]))


@pytest.mark.slow
def test_4_bit_quality_on_a_model_trained_on_a_larger_corpus(trained_on_more):
    """int4 (groups of 32) and int4-g64: validation loss within 3% of float32 (the issue's bound), group 32 no worse
    than 64 by more than noise; the 8-bit modes beside them for the table it prints."""
    model, (vx, vy) = trained_on_more
    with torch.no_grad():
        loss = model(vx, vy).item()
    assert loss < 4.0                                            # it learned from the text (ln 256 = 5.55)
    report = {}
    for mode in ("int8", "w8a8", "int4", "int4-g64"):
        with torch.no_grad():
            report[mode] = (quantize(clone(model), mode)(vx, vy).item() - loss) / loss
    print(f"\nval loss {loss:.4f}, relative change: " + ", ".join(f"{m} {c:+.4%}" for m, c in report.items()))
    assert all(abs(c) <= 3e-2 for c in report.values()), report
    assert abs(report["int4"]) <= abs(report["int4-g64"]) + 5e-3, report


@pytest.mark.slow                      # (its fixture trains a model: 12 s)
@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_batched_decoding_picks_the_same_tokens_as_single(trained, mode):
    """Rows of a batch decode with the same bits as alone (the kernel's math order; w8a8 quantizes each row by
    itself), so greedy batched generation gives each sequence the tokens it gets alone."""
    model, (vx, _) = trained
    q = quantize(clone(model), mode)
    prompts = vx[:4, :10]
    batched = generate(q, prompts, 20)
    for i in range(4):
        assert torch.equal(generate(q, prompts[i:i + 1], 20)[0], batched[i])


@pytest.mark.parametrize("mode", ["int8", "bf16", "w8a8", "int4"])
def test_save_and_load_round_trip(trained, tmp_path, gpt2_tokenizer, mode):
    from safetensors import safe_open

    from gptfast.training import load_checkpoint
    from gptfast.training.checkpoint import save_weights

    model, (vx, _) = trained
    q = quantize(clone(model), mode)
    path = save_weights(str(tmp_path / f"model-{mode}.safetensors"), q, gpt2_tokenizer)
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        head = f.get_tensor("out_head.weight")
    assert head.dtype == (torch.bfloat16 if mode == "bf16" else torch.int8)      # (a 4-bit model's head: w8a8)
    assert ("out_head.scales" in keys) == (mode != "bf16") and "trf_blocks.0.att.W_qkv.weight" in keys
    assert "tok_emb.weight" not in keys                          # tied: the head's rows serve both
    loaded, state = load_checkpoint(path, backend="extension")
    assert loaded.quantization == mode and state["quantization"] == mode
    with torch.no_grad():
        assert torch.equal(loaded(vx[:2]), q(vx[:2]))


@pytest.mark.slow
def test_cli_quantize_then_generate_and_no_training_from_it(trained, tmp_path, gpt2_tokenizer):
    from gptfast.training.checkpoint import save_weights

    model, _ = trained
    ckpt = save_weights(str(tmp_path / "model.safetensors"), model, gpt2_tokenizer)
    run = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint", ckpt, "--quantize", "int8",
                          "--max-new-tokens", "5", "--save-quantized", str(tmp_path / "q.safetensors")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Every effort moves you") and "int8" in run.stderr
    again = subprocess.run([sys.executable, "scripts/generate.py", "--checkpoint", str(tmp_path / "q.safetensors"),
                            "--max-new-tokens", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == run.stdout, again.stderr
    train = subprocess.run([sys.executable, "scripts/train.py", "--init-from", str(tmp_path / "q.safetensors"),
                            "--max-steps", "1", "--out", str(tmp_path / "run")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 2 and "quantized (int8), for inference only" in train.stderr, train.stderr
    export = subprocess.run([sys.executable, "scripts/export.py", "--checkpoint", str(tmp_path / "q.safetensors"),
                             "--out", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and "export the float32 checkpoint" in export.stderr, export.stderr

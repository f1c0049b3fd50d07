"""Single-device training options: accumulation, schedule, decay groups, precision, compile, clipping."""
import json
import math
from unittest import mock

import pytest
import torch

from gptfast.data import create_dataloaders
from gptfast.model import GPTConfig, GPTModel
from gptfast.training import ConfigError, TrainSettings, lr_at, make_optimizer, run_training
from gptfast.training.precision import keep_working_copies, refresh_working_copies
from test_training import train_directly


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny", **kw))


@pytest.mark.parametrize("optimizer,atol", [("adamw", 1e-5), ("sgd", 1e-6)])
def test_gradient_accumulation_equals_the_bigger_batch(verdict_text, gpt2_tokenizer, optimizer, atol):
    """Two micro-batches of 2 accumulated = one batch of 4. SGD's step is proportional to the gradient,
    so it also catches a missing 1/accum scale; AdamW's step m/sqrt(v) hardly depends on the gradient's
    size, so an element whose gradient is near zero can move ~1e-5 on float32 rounding alone (the two
    runs sum the same terms in different groupings) - hence its looser atol."""
    def final_weights(batch_size, accum):
        train, val = create_dataloaders(verdict_text, gpt2_tokenizer, batch_size=batch_size, context_length=32,
                                        seed=3)
        model = tiny()
        opt = make_optimizer(model, 1e-3, 0.1, "cpu") if optimizer == "adamw" else \
            torch.optim.SGD(model.parameters(), lr=0.5)
        hist = train_directly(model, train, val, gpt2_tokenizer, opt, epochs=1, eval_freq=1000, eval_iter=1,
                              start_context="a", sample_tokens=1, grad_accum=accum, dtype="float32")  # (auto: bf16
        # on a bf16-capable CPU, whose rounding would swamp the comparison)
        return hist, torch.cat([p.detach().flatten() for p in model.parameters()])

    hist_big, big = final_weights(4, 1)
    hist_acc, acc = final_weights(2, 2)
    assert hist_big.step == hist_acc.step and hist_big.tokens == hist_acc.tokens
    assert torch.allclose(big, acc, rtol=1e-4, atol=atol)
    assert not torch.equal(big, torch.cat([p.detach().flatten() for p in tiny().parameters()]))   # it trained


def test_lr_schedule():
    assert lr_at(0, 100, 1.0) == lr_at(99, 100, 1.0) == 1.0                  # defaults: constant
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)
    mid = lr_at(10 + 89 // 2, 100, 1.0, warmup_steps=10, min_lr=0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * (44 / 89))))


def test_weight_decay_only_on_matrices():
    model = tiny(tie_embeddings=True)
    opt = make_optimizer(model, 1e-3, 0.1, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()


def settings(tmp_path, verdict_text, **kw):
    data = tmp_path / "v.txt"
    data.write_text(verdict_text)
    base = dict(data=str(data), preset="tiny", dtype="float32", epochs=1, batch_size=4, context_length=32,
                eval_freq=100, eval_iter=1, out=str(tmp_path / "run"), progress=False)
    return TrainSettings(**{**base, **kw})


@pytest.mark.parametrize("backend", ["torch", "extension"])   # extension: bf16 widened for the CPU kernels
def test_bfloat16_autocast_schedule_and_clipping_on_cpu(tmp_path, verdict_text, backend):
    real_clip = torch.nn.utils.clip_grad_norm_
    with mock.patch("torch.nn.utils.clip_grad_norm_", side_effect=real_clip) as clip:
        summary = run_training(settings(tmp_path, verdict_text, dtype="bfloat16", grad_clip=1.0, warmup_steps=3,
                                        min_lr=1e-5, grad_accum=2, max_steps=6, backend=backend), echo=lambda _: None)
    assert math.isfinite(summary["final_train_loss"])
    assert clip.call_count == summary["steps"] and clip.call_args.args[1] == 1.0


def test_float16_needs_cuda(tmp_path, verdict_text):
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        run_training(settings(tmp_path, verdict_text, dtype="float16", device="cpu"), echo=lambda _: None)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, verdict_text):
    eager = run_training(settings(tmp_path, verdict_text, out=str(tmp_path / "e")), echo=lambda _: None)
    compiled = run_training(settings(tmp_path, verdict_text, compile=True, out=str(tmp_path / "c")),
                            echo=lambda _: None)
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-3)


def test_padded_vocabulary_shapes_and_config():
    cfg = GPTConfig(vocab_multiple=64)
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (50257, 50304)
    assert GPTConfig(vocab_size=128, vocab_multiple=64).padded_vocab_size == 128   # already a multiple
    model = tiny(vocab_size=1000, vocab_multiple=64)
    assert model.tok_emb.weight.shape[0] == model.out_head.weight.shape[0] == 1024
    assert model(torch.randint(0, 1000, (2, 5))).shape == (2, 5, 1024)
    with pytest.raises(ValueError, match="vocab_multiple must be positive"):
        GPTConfig(vocab_multiple=0)


def test_generation_never_picks_a_padded_id():
    from gptfast.generate import generate

    model = tiny(vocab_size=1000, vocab_multiple=64)
    with torch.no_grad():
        best = model(torch.tensor([[1, 2, 3]]))[0, -1, :1000].argmax()
        model.out_head.weight[1000:] = 5.0 * model.out_head.weight[best]     # padded logits: 5x the best one
        logits = model(torch.tensor([[1, 2, 3]]))[0, -1]
    assert logits.argmax() >= 1000                                   # unmasked, greedy would pick padding
    for kw in ({}, {"temperature": 1.0, "seed": 0}, {"temperature": 2.0, "top_k": 50, "seed": 1}):
        out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=20, **kw)
        assert out.max() < 1000, kw


def test_training_with_a_padded_vocabulary(tmp_path, verdict_text):
    from gptfast.training import load_checkpoint

    import json

    summary = run_training(settings(tmp_path, verdict_text, pad_vocab=True), echo=lambda _: None)
    losses = [r["loss"] for r in map(json.loads, open(summary["metrics"])) if r["event"] == "step"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5
    model, _ = load_checkpoint(summary["checkpoint"])
    assert model.cfg.vocab_multiple == 64 and model.out_head.weight.shape[0] == 50304
    assert summary["parameters"] == tiny().num_parameters() + 2 * 47 * 64               # 50304 - 50257 rows


def test_bfloat16_on_a_cpu_without_bf16_matmul_instructions_gets_a_note():
    from gptfast.training.optim import precision_note

    note = precision_note("bfloat16", "cpu", flags={"avx2", "fma"})
    assert note is not None and "--dtype float32" in note
    assert precision_note("bfloat16", "cpu", flags={"avx2", "avx512_bf16"}) is None
    assert precision_note("bfloat16", "cpu", flags={"amx_bf16"}) is None
    assert precision_note("float32", "cpu", flags={"avx2"}) is None
    assert precision_note("bfloat16", "cpu", flags=set()) is not None


def test_auto_precision_follows_the_hardware():
    from gptfast.training.optim import resolve_precision

    assert resolve_precision("auto", "cpu", flags={"avx2", "fma"}) == (
        "float32", "auto: this CPU has no bf16 matrix instructions (avx512_bf16, amx_bf16)")
    assert resolve_precision("auto", "cpu", flags={"avx512f", "avx512_bf16"}) == ("bfloat16", "auto: this CPU has avx512_bf16")
    assert resolve_precision("auto", "cpu", flags={"amx_bf16", "amx_tile"})[0] == "bfloat16"
    assert resolve_precision("float32", "cpu", flags={"avx512_bf16"}) == ("float32", "--dtype")
    assert resolve_precision("bfloat16", "cpu", flags={"avx2"}) == ("bfloat16", "--dtype")
    assert TrainSettings().dtype == "auto"


def test_the_run_says_which_precision_and_why(tmp_path, verdict_text):
    """The default (auto) on this machine: the banner line names the choice and the reason, the loop
    autocasts to it, and the metrics log records it; the checkpoint's weights stay float32."""
    from gptfast.training.optim import resolve_precision

    lines = []
    s = settings(tmp_path, verdict_text, dtype="auto", max_steps=2)
    summary = run_training(s, echo=lines.append)
    want, why = resolve_precision("auto", "cpu")
    assert any(line.startswith(f"precision: {want} ({why})") for line in lines), lines
    config = json.loads(open(summary["metrics"]).readline())
    assert config["precision"] == want and config["settings"]["dtype"] == "auto"
    model, _ = __import__("gptfast.training", fromlist=["load_checkpoint"]).load_checkpoint(summary["checkpoint"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_working_copies_train_exactly_like_autocast_without_casting_weights():
    """The 16-bit working copies of the linear weights (refreshed after each step) give bit-for-bit the
    losses and weights of plain autocast, while no forward casts a float32 weight any more."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    base = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0, backend="extension")).train()
    batch = torch.randint(0, 50257, (2, 17))
    shapes = {tuple(m.weight.shape) for m in base.modules() if isinstance(m, torch.nn.Linear)}

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 and \
                    tuple(args[0].shape) in shapes and (kwargs or {}).get("dtype") == torch.bfloat16:
                WeightCasts.count += 1
            return func(*args, **(kwargs or {}))

    def run(working: bool):
        model = copy.deepcopy(base)
        if working:
            keep_working_copies(model, torch.bfloat16)
        opt = make_optimizer(model, 1e-3, 0.1, "cpu")
        losses, WeightCasts.count = [], 0
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts():
                loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            refresh_working_copies(model)
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()], WeightCasts.count

    plain, plain_weights, plain_casts = run(False)
    kept, kept_weights, kept_casts = run(True)
    assert plain == kept and all(torch.equal(a, b) for a, b in zip(plain_weights, kept_weights))
    assert plain_casts >= 3 * len(shapes) and kept_casts == 0
    assert all(p.dtype == torch.float32 for p in kept_weights)            # the masters stay float32


@pytest.mark.slow
def test_working_copies_under_torch_compile_see_each_refresh():
    """A compiled bf16 step with working copies equals the eager one, step after step: the compiled graph
    reads the copies the optimizer step refreshed (not a constant captured at compile time)."""
    import copy

    torch.manual_seed(0)
    base = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0, backend="extension")).train()
    batch = torch.randint(0, 50257, (2, 17))

    def run(compiled: bool) -> list[float]:
        model = copy.deepcopy(base)
        keep_working_copies(model, torch.bfloat16)
        forward = torch.compile(model, fullgraph=True) if compiled else model
        opt, losses = make_optimizer(model, 1e-3, 0.1, "cpu"), []
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(batch[:, :-1], batch[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            refresh_working_copies(model)
            losses.append(loss.item())
        return losses

    eager = run(False)
    assert run(True) == eager and eager[1] != eager[0]

"""Single-device training options: accumulation, schedule, decay groups, precision, compile, clipping."""
import math
from unittest import mock

import pytest
import torch

from gptfast.data import create_dataloaders
from gptfast.model import GPTConfig, GPTModel
from gptfast.training import ConfigError, TrainSettings, lr_at, make_optimizer, run_training, train_model


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny", **kw))


def test_gradient_accumulation_equals_the_bigger_batch(verdict_text, gpt2_tokenizer):
    def final_weights(batch_size, accum):
        train, val = create_dataloaders(verdict_text, gpt2_tokenizer, batch_size=batch_size, context_length=32,
                                        seed=3)
        model = tiny()
        opt = make_optimizer(model, 1e-3, 0.1, "cpu")
        hist = train_model(model, train, val, opt, "cpu", 1, eval_freq=1000, eval_iter=1, start_context="a",
                           tokenizer=gpt2_tokenizer, progress=False, sample_tokens=1, grad_accum=accum)
        return hist, torch.cat([p.detach().flatten() for p in model.parameters()])

    hist_big, big = final_weights(4, 1)
    hist_acc, acc = final_weights(2, 2)
    assert hist_big.step == hist_acc.step and hist_big.tokens == hist_acc.tokens
    assert torch.allclose(big, acc, rtol=1e-4, atol=1e-6)


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
    base = dict(data=str(data), preset="tiny", epochs=1, batch_size=4, context_length=32, eval_freq=100, eval_iter=1,
                out=str(tmp_path / "run"), progress=False)
    return TrainSettings(**{**base, **kw})


def test_bfloat16_autocast_schedule_and_clipping_on_cpu(tmp_path, verdict_text):
    real_clip = torch.nn.utils.clip_grad_norm_
    with mock.patch("torch.nn.utils.clip_grad_norm_", side_effect=real_clip) as clip:
        summary = run_training(settings(tmp_path, verdict_text, dtype="bfloat16", grad_clip=1.0, warmup_steps=5,
                                        min_lr=1e-5, grad_accum=2), echo=lambda _: None)
    assert math.isfinite(summary["final_train_loss"])
    assert clip.call_count == summary["steps"] and clip.call_args.args[1] == 1.0


def test_float16_needs_cuda(tmp_path, verdict_text):
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        run_training(settings(tmp_path, verdict_text, dtype="float16", device="cpu"), echo=lambda _: None)


def test_compiled_training_matches_eager(tmp_path, verdict_text):
    eager = run_training(settings(tmp_path, verdict_text, out=str(tmp_path / "e")), echo=lambda _: None)
    compiled = run_training(settings(tmp_path, verdict_text, compile=True, out=str(tmp_path / "c")),
                            echo=lambda _: None)
    assert compiled["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-3)

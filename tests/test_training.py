import json
import os

import pytest
import torch

from gptfast.data import create_dataloaders
from gptfast.model import GPTConfig, GPTModel
from gptfast.training import (ConfigError, MetricsLog, TrainSettings, TrainingState, calc_loss_loader,
                              load_checkpoint, plot_losses, run_training, save_checkpoint, train)
from gptfast.training.data import TrainingData
from gptfast.training.parallel import SINGLE


def train_directly(model, train_loader, val_loader, tokenizer, optimizer=None, **settings):
    """The loop on its own (no run folder): the state started fresh for `model`, optionally another optimizer."""
    s = TrainSettings(progress=False, **settings)
    state = TrainingState.start(s, model, SINGLE, None, total_steps=s.epochs * len(train_loader))
    if optimizer is not None:
        state.optimizer = optimizer
    return train(s, state, TrainingData(tokenizer, train_loader, val_loader, 32, ""))


def tiny_model(vocab_size=50257, seed=123):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny", vocab_size=vocab_size))


def test_thirty_steps_lower_the_loss(verdict_text, gpt2_tokenizer):
    train, val = create_dataloaders(verdict_text, gpt2_tokenizer, batch_size=4, context_length=32,
                                    stride=32, seed=1)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    before = calc_loss_loader(train, model, "cpu", num_batches=8)
    hist = train_directly(model, train, val, gpt2_tokenizer, optimizer, epochs=1, eval_freq=10, eval_iter=2,
                          start_context="Every effort moves you", sample_tokens=5)
    after = calc_loss_loader(train, model, "cpu", num_batches=8)
    assert hist.step == len(train) >= 30
    assert hist.eval_steps == list(range(0, hist.step, 10))
    assert hist.tokens == hist.step * 4 * 32
    assert before > 10.0                                    # ~ln(50257) = 10.8 at initialization
    assert after < before - 2.0
    assert len(hist.samples) == 1 and hist.samples[0].startswith("Every effort moves you")


def test_checkpoint_round_trip(tmp_path, gpt2_tokenizer):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 50257, (2, 10))
    model(idx).sum().backward()
    optimizer.step()
    path = save_checkpoint(str(tmp_path / "ck.pt"), model, optimizer, gpt2_tokenizer, step=7)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]      # no temporary file left behind
    loaded, state = load_checkpoint(path)
    model.eval(), loaded.eval()
    assert torch.equal(model(idx), loaded(idx))
    assert state["step"] == 7 and state["tokenizer"] == {"name": "gpt2"}
    assert loaded.cfg.to_dict() | {"backend": None} == model.cfg.to_dict() | {"backend": None}
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    torch.load(path, weights_only=True)                    # nothing but tensors and plain types


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path))
    torch.save({"hello": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a gptfast checkpoint"):
        load_checkpoint(str(tmp_path))


def test_metrics_log_and_plot(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"))
    log.write("eval", step=0, train_loss=3.0)
    log.write("eval", step=5, train_loss=2.0)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5] and all("time_s" in r for r in records)
    png = plot_losses([0, 5, 10], [0, 100, 200], [3.0, 2.0, 1.5], [3.1, 2.5, 2.4], str(tmp_path / "l.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def run_settings(tmp_path, text_path, **kw):
    base = dict(data=str(text_path), preset="tiny", epochs=1, batch_size=4, context_length=32,
                eval_freq=5, eval_iter=1, out=str(tmp_path / "run"), progress=False)
    return TrainSettings(**{**base, **kw})


def test_run_training_writes_everything(tmp_path, verdict_text):
    text_path = tmp_path / "v.txt"
    text_path.write_text(verdict_text)
    lines = []
    summary = run_training(run_settings(tmp_path, text_path, backend="torch"), echo=lines.append)
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "loss.png", "metrics.jsonl", "model.safetensors"]
    events = [json.loads(x)["event"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "config" and events[-1] == "done" and "eval" in events and "sample" in events
    assert any(line.startswith("parameters: 6,536,704 | device: cpu | backend: torch") for line in lines)
    assert not any(line.strip().startswith("auto:") for line in lines)   # a named backend: no auto lines
    assert any("tokens/step: 128 (4 x 32)" in line for line in lines)
    assert summary["final_train_loss"] < 10.8


def test_run_training_with_our_bpe(tmp_path, verdict_text):
    text_path = tmp_path / "v.txt"
    text_path.write_text(verdict_text)
    summary = run_training(run_settings(tmp_path, text_path, tokenizer="bpe", bpe_vocab_size=300,
                                        backend="reference"), echo=lambda _: None)
    model, state = load_checkpoint(summary["checkpoint"])
    assert model.cfg.vocab_size == 300 and state["tokenizer"]["name"] == "bpe"


def test_run_training_user_errors(tmp_path, verdict_text):
    text_path = tmp_path / "v.txt"
    text_path.write_text(verdict_text)
    with pytest.raises(ConfigError, match="context length 64"):
        run_training(run_settings(tmp_path, text_path, context_length=65), echo=lambda _: None)
    with pytest.raises(ConfigError, match="unknown preset"):
        run_training(run_settings(tmp_path, text_path, preset="giant"), echo=lambda _: None)
    with pytest.raises(ConfigError, match="text too short"):
        run_training(run_settings(tmp_path, text_path, context_length=64, batch_size=1,
                                  train_ratio=0.999), echo=lambda _: None)


@pytest.mark.slow
def test_init_from_a_gptfast_checkpoint(tmp_path, verdict_text):
    text_path = tmp_path / "v.txt"
    text_path.write_text(verdict_text)
    first = run_training(run_settings(tmp_path, text_path, out=str(tmp_path / "a")), echo=lambda _: None)
    lines = []
    second = run_training(run_settings(tmp_path, text_path, out=str(tmp_path / "b"), init_from=first["checkpoint"]),
                          echo=lines.append)
    assert any(line.startswith("initialized from gptfast checkpoint") for line in lines)
    assert second["final_train_loss"] < first["final_train_loss"]         # it continued, not restarted
    lines = []
    run_training(run_settings(tmp_path, text_path, out=str(tmp_path / "c"), init_from=first["checkpoint"],
                              pad_vocab=True, epochs=1), echo=lines.append)
    assert "note: --pad-vocab shapes fresh models only; the --init-from weights keep their own layout" in lines
    with pytest.raises(ConfigError, match="no such file or folder"):
        run_training(run_settings(tmp_path, text_path, init_from=str(tmp_path / "nope")), echo=lambda _: None)


def test_the_textbook_step_is_what_the_fast_loop_computes(gpt2_tokenizer):
    """train_step (logits -> F.cross_entropy -> backward -> step) and train() (the LM head fused with the loss,
    the run's machinery around it) from the same weights on the same batches: the same losses, step by step,
    and the same weights after them."""
    import copy

    from gptfast.training import train_step

    g = torch.Generator().manual_seed(5)
    data = torch.randint(0, 50257, (6, 2, 17), generator=g)
    batches = [(b[:, :-1], b[:, 1:]) for b in data]              # a list: no shuffle, the same order for both
    fast = tiny_model()
    simple = copy.deepcopy(fast)
    hist = train_directly(fast, batches, batches[:1], gpt2_tokenizer, torch.optim.AdamW(fast.parameters(), lr=1e-3),
                          epochs=1, eval_freq=100, eval_iter=1, dtype="float32", sample_tokens=2)
    optimizer = torch.optim.AdamW(simple.parameters(), lr=1e-3)
    losses = [train_step(simple, optimizer, x, y) for x, y in batches]
    fast_losses = [loss for _, loss in hist.batch_losses]
    assert len(fast_losses) == 6 and losses[-1] < losses[0]
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(fast_losses, losses)), (fast_losses, losses)
    for (name, a), b in zip(fast.named_parameters(), simple.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_the_textbook_step_has_the_fused_losss_gradients():
    """One step's gradients: F.cross_entropy on the (B, T, V) logits vs the model's fused LM head + loss."""
    model = tiny_model()
    x, y = torch.randint(0, 50257, (2, 2, 16), generator=torch.Generator().manual_seed(6))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        loss = model(x, y) if fused else torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-12


def test_train_simple_lowers_the_loss(verdict_text, gpt2_tokenizer, capsys):
    from gptfast.training import train_simple

    train_loader, val_loader = create_dataloaders(verdict_text, gpt2_tokenizer, batch_size=4, context_length=32,
                                                  stride=32, seed=1)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    train_losses, val_losses = train_simple(model, train_loader, val_loader, optimizer, epochs=1, eval_freq=10,
                                            eval_iter=2)
    assert len(train_losses) == len(val_losses) == -(-len(train_loader) // 10)
    assert train_losses[-1] < train_losses[0] - 2.0
    assert "Ep 1 (Step 000010): Train loss" in capsys.readouterr().out

"""Fault tolerance: exact resume, checkpoint rotation, non-finite losses, unreadable checkpoints."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, wait_for_step
from gptfast.training import (ConfigError, NonFiniteLoss, StopOnSignal, TrainSettings, load_checkpoint,
                              run_training)
from gptfast.training.parallel import SINGLE


def settings(tmp_path, text, out, **kw):
    data = tmp_path / "v.txt"
    data.write_text(text)
    base = dict(data=str(data), preset="tiny", epochs=2, batch_size=4, context_length=32, eval_freq=7, eval_iter=2,
                out=str(out), progress=False, grad_accum=2)
    return TrainSettings(**{**base, **kw})


def step_losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "step"}


@pytest.mark.parametrize("preset", ["tiny", "qwen3-tiny"])
def test_stopped_and_resumed_run_matches_an_uninterrupted_one_bitwise(tmp_path, verdict_text, preset):
    quiet = lambda _: None  # noqa: E731
    # dropout on: the resumed run must replay the same dropout draws and the same shuffles
    full = run_training(settings(tmp_path, verdict_text, tmp_path / "full", drop_rate=0.1, preset=preset), echo=quiet)
    cut = tmp_path / "cut"
    run_training(settings(tmp_path, verdict_text, cut, drop_rate=0.1, checkpoint_every=4, max_steps=13,
                          keep_checkpoints=2, preset=preset), echo=quiet)
    assert sorted(os.listdir(cut)) == ["checkpoint.pt", "ckpt-step0000008.pt", "ckpt-step0000012.pt", "loss.png",
                                       "metrics.jsonl", "model.safetensors"]                 # only the last 2 periodic ones kept
    resumed = run_training(settings(tmp_path, verdict_text, cut, drop_rate=0.1, resume="auto", preset=preset),
                           echo=quiet)
    a, b = step_losses(tmp_path / "full"), step_losses(cut)
    assert resumed["steps"] == full["steps"]
    assert all(a[k] == b[k] for k in a)                  # bitwise: steps 0-12 first run, 12.. resumed
    assert resumed["final_val_loss"] == full["final_val_loss"]
    model_a, _ = load_checkpoint(full["checkpoint"])
    model_b, _ = load_checkpoint(resumed["checkpoint"])
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))


@pytest.mark.slow
def test_killed_process_resumes_from_its_last_checkpoint(tmp_path, verdict_text):
    data = tmp_path / "v.txt"
    data.write_text(verdict_text)
    args = [sys.executable, "scripts/train.py", "--data", str(data), "--preset", "tiny", "--epochs", "3",
            "--batch-size", "2", "--context-length", "32", "--eval-freq", "1000", "--no-progress",
            "--checkpoint-every", "3", "--max-steps", "40", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir.is_dir() and any(run_dir.glob("ckpt-step*.pt"))):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(f for f in os.listdir(tmp_path / "run") if f.startswith("ckpt-step"))
    assert kept, "no checkpoint was written before the kill"
    done = subprocess.run(args + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Resuming at epoch" in done.stdout and os.path.isfile(tmp_path / "run" / "checkpoint.pt")


def test_non_finite_loss_stops_and_names_the_step(tmp_path, verdict_text, monkeypatch):
    import gptfast.training.loop as loop

    real = loop.calc_loss_batch
    calls = {"n": 0}

    def nan_on_the_fifth_step(*args, **kwargs):                 # 2 micro-batches per step
        loss = real(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 8 else loss

    monkeypatch.setattr(loop, "calc_loss_batch", nan_on_the_fifth_step)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss \(nan\) at step 4 .*last good checkpoint: .*ckpt-step0000004"):
        run_training(settings(tmp_path, verdict_text, tmp_path / "nan", checkpoint_every=2, eval_freq=1000),
                     echo=lambda _: None)


def test_corrupt_truncated_and_foreign_checkpoints(tmp_path, verdict_text):
    good = run_training(settings(tmp_path, verdict_text, tmp_path / "ok", epochs=1), echo=lambda _: None)["checkpoint"]
    blob = open(good, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(blob[: len(blob) // 2])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 10)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "gptfast-checkpoint", "x": os.system}, evil)   # a pickled callable
    for path in (truncated, corrupt, evil):
        with pytest.raises(ValueError, match="not a readable gptfast checkpoint"):
            load_checkpoint(str(path))
    with pytest.raises(ConfigError, match="--resume: .*not a readable gptfast checkpoint"):
        run_training(settings(tmp_path, verdict_text, tmp_path / "r", resume=str(truncated)), echo=lambda _: None)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_printed_command_resumes_bitwise(tmp_path, verdict_text):
    data = tmp_path / "v.txt"
    data.write_text(verdict_text)

    def args(out):   # 72 micro-batches per epoch: 36 steps of 2; the stop lands mid-epoch
        return ["scripts/train.py", "--data", str(data), "--preset", "tiny", "--epochs", "1", "--batch-size", "2",
                "--context-length", "32", "--grad-accum", "2", "--drop-rate", "0.1", "--eval-freq", "10",
                "--eval-iter", "1", "--no-progress", "--out", str(out)]

    full = subprocess.run([sys.executable, *args(tmp_path / "full")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *args(run)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(proc, run)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "SIGINT received: finishing the step in progress" in out
    stopped = re.search(r"stopped by SIGINT after step (\d+) \(epoch 1\); checkpoint: (\S+)", err)
    assert stopped, err
    assert 1 <= int(stopped[1]) < 36, "the stop should land mid-epoch"
    assert os.path.isfile(stopped[2]) and not os.path.isfile(run / "checkpoint.pt")
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "stopped"
    command = shlex.split(re.search(r"to continue: (.*)", err)[1])
    assert command[:2] == ["python", "scripts/train.py"] and command[-2:] == ["--resume", "auto"]
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"Resuming at epoch 1, step {stopped[1]}" in done.stdout
    assert step_losses(tmp_path / "full") == step_losses(run)              # bitwise, every step
    a, _ = load_checkpoint(str(tmp_path / "full"))
    b, _ = load_checkpoint(str(run))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_second_signal_stops_at_once(tmp_path):
    """First signal: a flag. Second: KeyboardInterrupt for SIGINT, the default action for SIGTERM."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal(announce=lambda text: None) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and SINGLE.agreed_stop(stop.signum) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before    # handlers given back
    code = ("import os, signal, time\nfrom gptfast.training import StopOnSignal\n"
            "with StopOnSignal(print):\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM and "SIGTERM again: stopping now" in proc.stdout


def test_a_checkpoint_with_the_old_history_names_still_resumes(tmp_path, verdict_text):
    """Checkpoints written before the training package was staged named History's lists `steps` and
    `tokens_seen`; they load into `eval_steps` / `eval_tokens` and the run continues."""
    quiet = lambda _: None  # noqa: E731
    run = tmp_path / "run"
    run_training(settings(tmp_path, verdict_text, run, epochs=1, checkpoint_every=4, max_steps=8, eval_freq=3),
                 echo=quiet)
    path = run / "ckpt-step0000008.pt"
    ckpt = torch.load(path, weights_only=True)
    history = ckpt["history"]
    history["steps"], history["tokens_seen"] = history.pop("eval_steps"), history.pop("eval_tokens")
    torch.save(ckpt, path)
    lines = []
    summary = run_training(settings(tmp_path, verdict_text, run, epochs=1, resume="auto", eval_freq=3),
                           echo=lines.append)
    assert summary["steps"] > 8 and summary["final_val_loss"] is not None
    resumed = torch.load(summary["checkpoint"], weights_only=True)["history"]
    assert resumed["eval_steps"][:3] == [0, 3, 6] and len(resumed["eval_tokens"]) == len(resumed["eval_steps"])


def test_bf16_runs_resume_bitwise_and_across_the_precision_choice(tmp_path, verdict_text):
    """Under bfloat16 (working copies of the weights, refreshed each step) a stopped run resumes to the
    same losses and weights bit for bit; a float32 checkpoint continues under bfloat16 (the weights in
    checkpoints are float32 whatever the precision)."""
    quiet = lambda _: None  # noqa: E731
    short = dict(epochs=1, drop_rate=0.1, dtype="bfloat16", grad_accum=1, eval_freq=1000)
    full = run_training(settings(tmp_path, verdict_text, tmp_path / "full", max_steps=4, **short), echo=quiet)
    cut = tmp_path / "cut"
    run_training(settings(tmp_path, verdict_text, cut, max_steps=2, checkpoint_every=2, **short), echo=quiet)
    resumed = run_training(settings(tmp_path, verdict_text, cut, max_steps=4, resume="auto", **short), echo=quiet)
    a, b = step_losses(tmp_path / "full"), step_losses(cut)
    assert sorted(b) == list(range(4)) and all(a[k] == b[k] for k in a)
    model_a, _ = load_checkpoint(full["checkpoint"])
    model_b, _ = load_checkpoint(resumed["checkpoint"])
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert all(v.dtype == torch.float32 for v in model_b.state_dict().values() if v.is_floating_point())
    other = tmp_path / "fp32"
    run_training(settings(tmp_path, verdict_text, other, max_steps=1, checkpoint_every=1,
                          **{**short, "dtype": "float32"}), echo=quiet)
    lines = []
    again = run_training(settings(tmp_path, verdict_text, other, max_steps=2, resume="auto", **short), echo=lines.append)
    assert again["steps"] == 2 and any(line.startswith("precision: bfloat16 (--dtype)") for line in lines)

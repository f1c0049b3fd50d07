"""Data-parallel training: torchrun with 2 Gloo processes (DDP or FSDP) computes what 1 process computes."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, rel_error, verdict_path, wait_for_step
from gptfast.data import RankStridedBatches
from gptfast.training import ConfigError, TrainSettings, load_checkpoint, run_training
from gptfast.training.parallel import SINGLE, Parallelism

pytestmark = pytest.mark.slow     # the second tier (.ci/run): subprocess runs, minutes in all

# 72 micro-batches of 2 x 32 tokens per epoch in the-verdict's train split: 18 steps of 4.
RUN = ["--preset", "tiny", "--dtype", "float32", "--epochs", "2", "--batch-size", "2", "--context-length", "32", "--grad-accum", "4",
       "--eval-freq", "4", "--eval-iter", "3", "--no-progress", "--checkpoint-every", "10", "--keep-checkpoints", "9"]


def records(out, event):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["event"] == event]


def one_process_settings(out, **kw):
    base = dict(data=str(verdict_path()), preset="tiny", dtype="float32", epochs=2, batch_size=2, context_length=32,
                grad_accum=4, eval_freq=4, eval_iter=3, progress=False, checkpoint_every=10, keep_checkpoints=9,
                out=str(out))
    return TrainSettings(**{**base, **kw})


def torchrun(*args, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py",
           "--data", str(verdict_path()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def assert_exports_to_transformers(run_folder, tmp_path):
    """A distributed run's checkpoint (gathered on rank 0) exports to a folder transformers loads
    and computes the same logits from."""
    transformers = pytest.importorskip("transformers", reason="the export check needs the `transformers` test extra",
                                       exc_type=ImportError)
    from gptfast.model import export_hf
    from gptfast.tokenizer import get_tokenizer

    model, _ = load_checkpoint(str(run_folder), backend="reference")
    export_hf(model.eval(), str(tmp_path), tokenizer=get_tokenizer("gpt2"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([get_tokenizer("gpt2").encode(verdict_path().read_text())[:64]])
    with torch.no_grad():
        assert rel_error(theirs(x).logits, model(x)) < 1e-5


def step_losses(out):
    return {r["step"]: r["loss"] for r in records(out, "step")}


def assert_same_weights(run_a, run_b):
    m1, _ = load_checkpoint(str(run_a))
    m2, _ = load_checkpoint(str(run_b))
    for (name, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.linalg.vector_norm(p1 - p2) <= 1e-5 * torch.linalg.vector_norm(p1), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training run in one process and, through torchrun, in two Gloo processes."""
    base = tmp_path_factory.mktemp("ddp")
    single = run_training(one_process_settings(base / "one"), echo=lambda *_: None)
    done = torchrun(*RUN, "--out", str(base / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"one": base / "one", "two": base / "two", "single": single, "stdout": done.stdout, "base": base}


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = runs["one"], runs["two"]
    steps_1, steps_2 = records(one, "step"), records(two, "step")
    assert [r["step"] for r in steps_1] == [r["step"] for r in steps_2] == list(range(36))  # logged once, by rank 0
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(steps_1, steps_2)) < 1e-5
    evals_1, evals_2 = records(one, "eval"), records(two, "eval")
    assert len(evals_1) == len(evals_2) == 9
    for a, b in zip(evals_1, evals_2):
        assert a["tokens_seen"] == b["tokens_seen"]                    # global tokens, not one rank's
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5           # evaluation split across ranks...
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5               # ...and summed back
    assert steps_1[-1]["loss"] < steps_1[0]["loss"] - 0.5              # it did learn something
    assert_same_weights(one, two)
    assert records(two, "config")[0]["world_size"] == 2
    assert "distributed: 2 processes (Gloo, DDP: model replicated)" in runs["stdout"]
    assert runs["stdout"].count("Before training") == 1                 # rank 0 alone prints


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    ckpts = sorted(f for f in os.listdir(runs["two"]) if f.startswith("ckpt-step"))
    assert ckpts == ["ckpt-step0000010.pt", "ckpt-step0000020.pt", "ckpt-step0000030.pt"]
    out = runs["base"] / "resumed"
    run_training(one_process_settings(out, resume=str(runs["two"] / "ckpt-step0000020.pt")), echo=lambda *_: None)
    resumed, uninterrupted = step_losses(out), step_losses(runs["one"])
    assert sorted(resumed) == list(range(20, 36))
    assert max(abs(resumed[s] - uninterrupted[s]) for s in resumed) < 1e-5


def test_a_replicated_runs_checkpoint_exports_to_transformers(runs):
    assert_exports_to_transformers(runs["two"], runs["base"] / "hf")


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resumes(runs):
    """What a cluster's time limit does: SIGTERM to torchrun, which forwards it to every rank. The
    ranks agree on the step, rank 0 writes the checkpoint, and `--resume auto` continues the run."""
    out = runs["base"] / "term"
    proc = torchrun(*RUN, "--out", str(out), wait=False)
    wait_for_step(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    stopped = re.search(r"stopped by SIGTERM after step (\d+) \(epoch \d\); checkpoint: (\S+ckpt-step\d+\.pt)", err)
    assert stopped, err[-3000:]
    assert err.count("train.py: stopped by SIGTERM") == 1                # rank 0 speaks for both
    step = int(stopped[1])
    assert 1 <= step < 36 and os.path.isfile(stopped[2])
    done = torchrun(*RUN, "--out", str(out), "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming at epoch" in done.stdout and f"step {step} " in done.stdout
    resumed, uninterrupted = step_losses(out), step_losses(runs["two"])
    assert sorted(resumed) == list(range(36))
    assert max(abs(resumed[k] - uninterrupted[k]) for k in resumed) < 1e-6


def test_rank_strided_batches_cover_an_epoch_once_and_evenly():
    batches = [[i] for i in range(11)]
    shares = [list(RankStridedBatches(batches, r, 3)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]                       # the last 11 % 3 batches dropped
    assert sorted(b[0] for s in shares for b in s) == list(range(9))
    assert shares[1] == [[1], [4], [7]]
    assert len(RankStridedBatches(batches, 0, 3)) == 3


def test_grad_accum_must_split_evenly_across_processes(tmp_path):
    assert Parallelism(rank=1, world_size=4).per_rank_accum(8) == 2
    assert SINGLE.per_rank_accum(3) == 3
    with pytest.raises(ValueError, match="--grad-accum 3 must be a multiple of the number of processes \\(2\\)"):
        Parallelism(world_size=2).per_rank_accum(3)


def test_torchrun_with_an_indivisible_grad_accum_says_so_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py",
           "--data", str(verdict_path()), "--preset", "tiny", "--grad-accum", "3",
           "--out", str(tmp_path / "x"), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert done.stderr.count("train.py: error: --grad-accum 3 must be a multiple of the number of "
                             "processes (2)") == 1, done.stderr                     # said once, by rank 0
    assert f"{ROOT / 'gptfast'}{os.sep}" not in done.stderr   # no traceback through our code (torchrun adds its own)


def test_resume_needs_a_position_the_processes_can_split(runs, tmp_path):
    ckpt = torch.load(runs["two"] / "ckpt-step0000010.pt", weights_only=True)
    ckpt["position"]["micro_in_epoch"] = 41                  # odd: not a step boundary of 2 processes
    torch.save(ckpt, tmp_path / "odd.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "scripts/train.py",
           "--data", str(verdict_path()), *RUN, "--out", str(tmp_path / "x"),
           "--resume", str(tmp_path / "odd.pt")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "41 micro-batches of its epoch, which 2 processes cannot split evenly" in done.stderr


def test_fsdp_shards_and_matches_one_process(tmp_path):
    """FSDP (tied embeddings: one parameter in two places) against the same run in one process;
    its checkpoint (gathered, optimizer state by parameter name) resumes in one process."""
    one = tmp_path / "one"
    run_training(one_process_settings(one, tie_embeddings=True), echo=lambda *_: None)
    done = torchrun(*RUN, "--tie-embeddings", "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed: 2 processes (Gloo, FSDP: model sharded)" in done.stdout
    sharded, single = step_losses(tmp_path / "fsdp"), step_losses(one)
    assert sorted(sharded) == list(range(36)) and max(abs(sharded[k] - single[k]) for k in single) < 1e-5
    for a, b in zip(records(one, "eval"), records(tmp_path / "fsdp", "eval")):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5
    assert_same_weights(one, tmp_path / "fsdp")
    ckpt = torch.load(tmp_path / "fsdp" / "ckpt-step0000020.pt", weights_only=True)
    assert ckpt["optimizer_format"] == "fqn" and "trf_blocks.0.att.W_query.weight" in ckpt["optimizer"]["state"]
    out = tmp_path / "resumed"
    run_training(one_process_settings(out, tie_embeddings=True, resume=str(tmp_path / "fsdp" / "ckpt-step0000020.pt")),
                 echo=lambda *_: None)
    resumed = step_losses(out)
    assert sorted(resumed) == list(range(20, 36)) and max(abs(resumed[k] - single[k]) for k in resumed) < 1e-5
    assert_exports_to_transformers(tmp_path / "fsdp", tmp_path / "hf")      # tied, gathered from the shards


def test_fsdp_resumes_a_replicated_runs_checkpoint(runs, tmp_path):
    """A DDP checkpoint (optimizer state numbered) continues as an FSDP run (state by name, sharded)."""
    done = torchrun(*RUN, "--fsdp", "--out", str(tmp_path / "x"), "--resume", str(runs["two"] / "ckpt-step0000020.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = step_losses(tmp_path / "x"), step_losses(runs["one"])
    assert sorted(resumed) == list(range(20, 36))
    assert max(abs(resumed[k] - uninterrupted[k]) for k in resumed) < 1e-5


def test_fsdp_needs_several_processes(tmp_path):
    with pytest.raises(ConfigError, match="--fsdp shards the model across processes: launch with torchrun"):
        run_training(one_process_settings(tmp_path / "x", fsdp=True), echo=lambda *_: None)


def test_fsdp_trains_the_qwen3_family_as_one_process(tmp_path):
    """The Llama/Qwen3 block (RMSNorm, GQA, RoPE, SwiGLU; tied head) under FSDP: the losses of one process."""
    one = tmp_path / "one"
    run_training(one_process_settings(one, preset="qwen3-tiny"), echo=lambda *_: None)
    flags = [a if a != "tiny" else "qwen3-tiny" for a in RUN]
    done = torchrun(*flags, "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    sharded, single = step_losses(tmp_path / "fsdp"), step_losses(one)
    assert sorted(sharded) == list(range(36)) and max(abs(sharded[k] - single[k]) for k in single) < 1e-5
    assert_same_weights(one, tmp_path / "fsdp")

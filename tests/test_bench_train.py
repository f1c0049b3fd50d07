"""bench_train.py at a tiny size, its FLOP count by hand, and the peak-FLOPs lookup."""
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train  # noqa: E402
from gptfast.model import GPTConfig, GPTModel  # noqa: E402


def test_flops_per_token_by_hand():
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-124m"))
    n = 163_009_536 - 1024 * 768                      # without the position embeddings
    assert bench_train.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_peak_lookup_by_name():
    assert bench_train.peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert bench_train.peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert bench_train.peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) == 156.0
    assert bench_train.peak_tflops("Some Future GPU", torch.bfloat16) is None     # never guessed


def test_tiny_run_writes_json(tmp_path):
    out = tmp_path / "t.json"
    rc = bench_train.main(["--device", "cpu", "--preset", "tiny", "--backends", "torch,extension", "--compile", "off",
                           "--batch-size", "2", "--context-length", "16", "--steps", "2", "--warmup", "1",
                           "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["backend"] for r in data["results"]] == ["torch", "extension"]
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["speedup_vs_torch_baseline"] > 0
        assert abs(r["tokens_per_s"] * r["step_ms"] / 1e3 - 2 * 16) < 1e-6
    assert "| extension | False | fused |" in (tmp_path / "t.md").read_text()


def test_fused_and_unfused_loss_rows_train_the_same_model(tmp_path):
    out = tmp_path / "f.json"
    assert bench_train.main(["--device", "cpu", "--preset", "tiny", "--backends", "extension", "--compile", "off",
                             "--batch-size", "2", "--context-length", "16", "--steps", "2", "--warmup", "1",
                             "--loss", "both", "--out", str(out)]) == 0
    fused, unfused = json.loads(out.read_text())["results"]
    assert (fused["loss"], unfused["loss"]) == ("fused", "unfused")
    assert abs(fused["final_loss"] - unfused["final_loss"]) < 1e-4     # same steps, same weights, same losses


def test_padded_vocabulary_row(tmp_path):
    out = tmp_path / "p.json"
    assert bench_train.main(["--device", "cpu", "--preset", "tiny", "--backends", "torch", "--compile", "off",
                             "--batch-size", "1", "--context-length", "8", "--steps", "1", "--warmup", "1",
                             "--pad-vocab", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["pad_vocab"] is True and data["results"][0]["vocab_rows"] == 50304

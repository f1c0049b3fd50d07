"""bench_generate's code paths at a tiny size, so they cannot rot: its configurations are data, not labels."""
import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_generate  # noqa: E402


def test_tiny_run_writes_every_configuration(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_generate, "read_bandwidth", lambda device: 10.0)
    out = tmp_path / "g.json"
    assert bench_generate.main(["--presets", "tiny", "--batch-sizes", "1,2", "--quantize", "none,int8", "--op-by-op",
                                "int8", "--per-block", "int8", "--new-tokens", "4", "--prompt-tokens", "3", "--rounds", "1",
                                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["path"], r["batch"]) for r in rows] == [(p, b) for b in (1, 2) for p in
                                                       ("baseline", "auto none", "auto int8", "auto int8 per-block",
                                                        "auto int8 op-by-op")]
    by = {(r["path"], r["batch"]): r for r in rows}
    assert by[("baseline", 1)]["backend"] == "torch" and not by[("baseline", 1)]["fused_decoding"]
    assert by[("auto int8 op-by-op", 2)]["quantize"] == "int8" and not by[("auto int8 op-by-op", 2)]["fused_decoding"]
    assert by[("auto int8", 2)]["fused_decoding"] is True and by[("auto none", 1)]["agreement_with_baseline"] == 1.0
    assert by[("auto int8 per-block", 2)]["fused_decoding"] == "blocks"
    # fused and op by op compute the same tokens (bit-for-bit the same logits)
    assert by[("auto int8", 1)]["agreement_with_baseline"] == by[("auto int8 op-by-op", 1)]["agreement_with_baseline"]
    assert all(r["tokens_per_s"] > 0 and r["vs_baseline"] > 0 for r in rows)
    assert all(len(r["tokens_per_s_rounds"]) == 1 for r in rows)              # each round's figure kept


def test_a_mode_run_again_must_be_measured_too():
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--quantize", "none", "--compile", "int8"])


@pytest.mark.parametrize("preset", ["tiny", "qwen3-tiny"])
def test_transformers_peer_runs_on_the_same_weights(preset, tmp_path, monkeypatch):
    """--peers transformers: transformers' generate on our exported weights picks the baseline's greedy tokens."""
    pytest.importorskip("transformers", reason="transformers is the [hf] extra")
    monkeypatch.setattr(bench_generate, "read_bandwidth", lambda device: 10.0)
    out = tmp_path / "g.json"
    assert bench_generate.main(["--presets", preset, "--batch-sizes", "1,2", "--quantize", "none", "--peers",
                                "transformers", "--new-tokens", "5", "--prompt-tokens", "3", "--rounds", "1",
                                "--out", str(out)]) == 0
    rows = {(r["path"], r["batch"]): r for r in json.loads(out.read_text())["results"]}
    for b in (1, 2):
        peer = rows[("transformers generate", b)]
        assert peer["peer"] == "transformers" and not peer["fused_decoding"]
        assert peer["agreement_with_baseline"] == 1.0 and peer["tokens_per_s"] > 0
        assert peer["weight_bytes_per_step"] == rows[("baseline", b)]["weight_bytes_per_step"]


def test_an_unknown_peer_is_refused():
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--peers", "vllm"])


def test_the_gptfast_rows_run_their_backend_whatever_comes_last(monkeypatch):
    """(The models were built with the last configuration's backend: a peer row last put the gptfast rows on
    `torch`.)"""
    args = bench_generate.parse_args(["--presets", "tiny", "--quantize", "none,int8", "--backend", "extension",
                                      "--peers", "transformers"])
    models, _ = bench_generate.build_models("tiny", bench_generate.configurations(args), torch.device("cpu"))
    backends = {c.label: getattr(m, "cfg", None) and m.cfg.backend for c, m in models.items() if not c.peer}
    assert backends == {"baseline": "torch", "extension none": "extension", "extension int8": "extension"}


def test_the_llama_cpp_peer_says_what_is_missing(monkeypatch):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import llama_cpp_peer

    monkeypatch.setattr(llama_cpp_peer, "available", lambda bin_dir=None: "llama_cpp is not installed (pip install ...)")
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--peers", "llama.cpp"])
    monkeypatch.setattr(llama_cpp_peer, "available", lambda bin_dir=None: None)
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--peers", "llama.cpp", "--llama-cpp-types", "q5_k"])
    args = bench_generate.parse_args(["--peers", "llama.cpp", "--llama-cpp-types", "q8_0,q4_0", "--quantize", "int8"])
    labels = [c.label for c in bench_generate.configurations(args)]
    assert labels[-2:] == ["llama.cpp q8_0", "llama.cpp q4_0"]
    assert not bench_generate.configurations(args)[-1].runs_batch(8)
    args = bench_generate.parse_args(["--peers", "llama.cpp", "--llama-cpp-bin", "/some/build/bin"])
    assert bench_generate.configurations(args)[-1].runs_batch(8)             # its own binary: every batch size


FAKE_BATCHED_BENCH = """#!/bin/sh
echo "llama.cpp says hello" >&2
echo '{"pp": 16, "tg": 200, "pl": 8, "t_pp": 0.25, "speed_pp": 512.0, "t_tg": 4.0, "speed_tg": 400.0}'
echo "$@" > "$(dirname "$0")/args"
"""


def test_llama_batched_bench_runner_reads_llama_cpp_timings(tmp_path):
    """The binary runner (a stand-in executable here): its arguments, llama.cpp's own timings scaled to the n - 1
    steps gptfast times, and a failing binary named with its message."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import llama_cpp_peer

    exe = tmp_path / "llama-batched-bench"
    exe.write_text(FAKE_BATCHED_BENCH)
    exe.chmod(0o755)
    runner = llama_cpp_peer.BatchedBenchRunner("m.gguf", 1024, 2, str(tmp_path))
    prefill, decode, tokens = runner.timed(torch.zeros(8, 16, dtype=torch.long), 200)
    assert (prefill, tokens) == (0.25, None) and decode == pytest.approx(4.0 * 199 / 200)
    args = (tmp_path / "args").read_text().split()
    assert [args[args.index(f) + 1] for f in ("-m", "-npp", "-ntg", "-npl", "-t", "-c")] == \
        ["m.gguf", "16", "200", "8", "2", "1792"]
    exe.write_text("#!/bin/sh\necho 'error: cannot load model' >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match="llama-batched-bench failed \\(exit 3\\): error: cannot load model"):
        runner.timed(torch.zeros(1, 4, dtype=torch.long), 8)
    why = llama_cpp_peer.available(str(tmp_path / "nowhere"))
    assert why.startswith("no executable llama-batched-bench in") or why.startswith("gguf is not installed")


def test_llama_cpp_rows_from_its_binary_at_every_batch_size(tmp_path, monkeypatch):
    """--llama-cpp-bin: the llama.cpp rows come from llama-batched-bench (a stand-in here) at batch 1 and 2, its
    own speed as the row's tokens/s, no tokens to compare."""
    pytest.importorskip("gguf", reason="gguf is the peers extra's (pip install gguf)")
    exe = tmp_path / "llama-batched-bench"
    exe.write_text(FAKE_BATCHED_BENCH)
    exe.chmod(0o755)
    monkeypatch.setattr(bench_generate, "read_bandwidth", lambda device: 10.0)
    out = tmp_path / "g.json"
    assert bench_generate.main(["--presets", "qwen3-tiny", "--batch-sizes", "1,2", "--quantize", "int8", "--peers",
                                "llama.cpp", "--llama-cpp-bin", str(tmp_path), "--llama-cpp-types", "q8_0",
                                "--new-tokens", "5", "--prompt-tokens", "3", "--rounds", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["args"]["llama_cpp_bin"] == tmp_path.name                  # the build's folder, not the path
    rows = {(r["path"], r["batch"]): r for r in record["results"]}
    for b in (1, 2):
        peer = rows[("llama.cpp q8_0", b)]
        assert peer["agreement_with_baseline"] is None and peer["prefill_ms"] == pytest.approx(250.0)
        assert peer["tokens_per_s"] == pytest.approx(b * 5 / 4.0)        # B n / t_tg: llama.cpp's speed_tg


def test_gguf_with_an_8_bit_head_keeps_the_blocks_4_bit(tmp_path):
    """q4_0+q8_0 (the bytes of gptfast's int4 modes): the token embedding / LM head q8_0, the blocks' weights q4_0."""
    gguf = pytest.importorskip("gguf", reason="gguf is the peers extra's (pip install gguf)")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import llama_cpp_peer
    from gptfast.model import GPTModel
    from gptfast.model.config import GPTConfig

    model = GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=64, n_heads=2, n_layers=1,
                               backend="torch")).eval()
    types = {}
    for qtype in ("q4_0", "q4_0+q8_0"):
        path = llama_cpp_peer.write_gguf(model, str(tmp_path / f"{qtype}.gguf"), qtype)
        types[qtype] = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["q4_0"]["token_embd.weight"] == "Q4_0" and types["q4_0+q8_0"]["token_embd.weight"] == "Q8_0"
    assert types["q4_0"]["blk.0.ffn_up.weight"] == types["q4_0+q8_0"]["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["q4_0+q8_0"]["blk.0.attn_norm.weight"] == "F32"


def test_llama_cpp_decodes_our_gguf_with_our_greedy_tokens(tmp_path):
    """Where the peers extra is installed: a GPT-2 model written as GGUF f32 decodes in llama.cpp to the tokens
    gptfast picks (the same weights, the same greedy rule)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import llama_cpp_peer

    why = llama_cpp_peer.available()
    if why is not None:
        pytest.skip(why)
    from gptfast.generate import generate
    from gptfast.model import GPTModel
    from gptfast.model.config import GPTConfig

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=2, n_layers=2,
                               qkv_bias=True, backend="torch")).eval()
    path = llama_cpp_peer.write_gguf(model, str(tmp_path / "m.gguf"), "f32")
    prompt = torch.tensor([[464, 3290, 318, 257]])
    _, _, tokens = llama_cpp_peer.LlamaCppRunner(path, n_ctx=64, threads=2).timed(prompt, 8)
    ours = generate(model, prompt, 8)[:, 4:]
    assert torch.equal(tokens, ours)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_llama_cpp_decodes_our_qwen3_and_llama_gguf_with_our_greedy_tokens(tmp_path, family):
    """Where the peers extra is installed: Qwen3 (q/k norms, halves rotated as ours) and Llama (its rows reordered
    for llama.cpp's rotation of neighbouring pairs) written as GGUF f32, token ids only, decode to our greedy tokens."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import llama_cpp_peer

    why = llama_cpp_peer.available()
    if why is not None:
        pytest.skip(why)
    from gptfast.generate import generate
    from gptfast.model import LlamaModel
    from gptfast.model.config import LlamaConfig

    torch.manual_seed(1)
    model = LlamaModel(LlamaConfig(vocab_size=300, context_length=64, emb_dim=64, hidden_dim=96, n_heads=4,
                                   n_kv_heads=2, head_dim=32, n_layers=2, rope_theta=10000.0,
                                   qk_norm=family == "qwen3", tie_embeddings=family == "qwen3",
                                   backend="torch")).eval()
    with torch.no_grad():                      # logits far from ties: the two tools' float sums agree on the argmax
        model.tok_emb.weight.mul_(20)
    path = llama_cpp_peer.write_gguf(model, str(tmp_path / "m.gguf"), "f32")
    prompt = torch.tensor([[5, 17, 250, 3]])
    _, _, tokens = llama_cpp_peer.LlamaCppRunner(path, n_ctx=64, threads=2).timed(prompt, 12)
    assert torch.equal(tokens, generate(model, prompt, 12)[:, 4:])

"""llama.cpp beside gptfast on the same weights: a GGUF file written from our model, decoded by llama.cpp through
llama-cpp-python (an optional benchmark extra, never part of the tests' install: `pip install llama-cpp-python gguf`
builds llama.cpp from source for this CPU).

    from llama_cpp_peer import available, write_gguf, LlamaCppRunner

`write_gguf(model, path, "f32" | "q8_0" | "q4_0" | "q4_0+q8_0")` writes a GPT-2 model (gptfast's GPTModel) as
llama.cpp's "gpt2" architecture, a Qwen3 / Llama model (LlamaModel) as "qwen3" / "llama", with the `gguf` package's
writer and quantizers: the tensor names and metadata keys of the GGUF format; GPT-2's BPE (the vocabulary and
merges gptfast ships) as GPT-2's tokenizer, no tokenizer for Qwen3 / Llama (token ids only); the 2-D weights in the
chosen type (q8_0: 8 bits and a scale a block of 32 - 8.5 bits a weight; q4_0: 4.5 bits), norms, biases and
positions in f32.
`LlamaCppRunner(path).timed(prompt_ids, n)` decodes greedily, one token per call as gptfast's loop does, and returns
(seconds to the first token, seconds for the rest, tokens).
`BatchedBenchRunner(path, bin_dir=...)` runs llama.cpp's own `llama-batched-bench` binary instead (built from
llama.cpp's source with its CMake; no Python between tokens, any batch size): B sequences of the prompt's length,
then n tokens each, its own timings (prompt processing, generation); it returns no tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import torch

# "q4_0+q8_0": the blocks' weights q4_0, the token embedding / LM head q8_0 - the bytes of gptfast's int4 modes (whose
# LM head stays 8-bit); llama.cpp's own quantizer keeps that tensor above 4 bits too (q6_K), "q4_0" is all 4-bit.
GGUF_TYPES = ("f32", "q8_0", "q4_0", "q4_0+q8_0")


def available(bin_dir: str | None = None) -> str | None:
    """None if llama.cpp can run here - llama-cpp-python, or llama-batched-bench in `bin_dir` - and gguf imports,
    else why not."""
    try:
        import gguf  # noqa: F401
        if bin_dir is None:
            import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install llama-cpp-python gguf: an optional benchmark extra)"
    if bin_dir is not None and not os.access(os.path.join(bin_dir, BATCHED_BENCH), os.X_OK):
        return f"no executable {BATCHED_BENCH} in {bin_dir} (llama.cpp's build/bin: cmake --build build --target " \
               f"{BATCHED_BENCH})"
    return None


BATCHED_BENCH = "llama-batched-bench"


def _gpt2_vocabulary() -> tuple[list[str], list[str]]:
    """GPT-2's 50,257 tokens (byte-level strings, by id) and its merges, from the files gptfast ships."""
    from gptfast.tokenizer import GPT2_FILES_DIR

    with open(os.path.join(GPT2_FILES_DIR, "encoder.json"), encoding="utf-8") as f:
        encoder = json.load(f)
    tokens = [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    with open(os.path.join(GPT2_FILES_DIR, "vocab.bpe"), encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
    return tokens, merges


def _gpt2_tensors(model) -> list[tuple[str, torch.Tensor, bool]]:
    """(GGUF name, tensor, quantizable) of a float GPTModel, in llama.cpp's "gpt2" names; Q, K and V stacked.
    quantizable: "head" for the token embedding / LM head, True for the blocks' weights, False for the rest."""
    V = model.cfg.vocab_size
    out = [("token_embd.weight", model.tok_emb.weight[:V], "head"),
           ("position_embd.weight", model.pos_emb.weight, False)]
    for i, b in enumerate(model.trf_blocks):
        att, ff, p = b.att, b.ff, f"blk.{i}."
        qkv_w = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight])
        qkv_b = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias]) if att.W_query.bias is not None \
            else torch.zeros(qkv_w.shape[0])
        out += [(p + "attn_norm.weight", b.norm1.weight, False), (p + "attn_norm.bias", b.norm1.bias, False),
                (p + "attn_qkv.weight", qkv_w, True), (p + "attn_qkv.bias", qkv_b, False),
                (p + "attn_output.weight", att.out_proj.weight, True), (p + "attn_output.bias", att.out_proj.bias, False),
                (p + "ffn_norm.weight", b.norm2.weight, False), (p + "ffn_norm.bias", b.norm2.bias, False),
                (p + "ffn_up.weight", ff.fc.weight, True), (p + "ffn_up.bias", ff.fc.bias, False),
                (p + "ffn_down.weight", ff.proj.weight, True), (p + "ffn_down.bias", ff.proj.bias, False)]
    out += [("output_norm.weight", model.final_norm.weight, False), ("output_norm.bias", model.final_norm.bias, False)]
    if not model.cfg.tie_embeddings:
        out.append(("output.weight", model.out_head.weight[:V], "head"))
    return out


def _llama_tensors(model) -> list[tuple[str, torch.Tensor, bool | str]]:
    """(GGUF name, tensor, quantizable) of a float LlamaModel in llama.cpp's "qwen3" / "llama" names. llama.cpp's
    "llama" rotates pairs of neighbouring dimensions where ours (and Hugging Face's) rotates the two halves of a
    head: its query and key rows are reordered so that dimension i and i + hs/2 sit side by side (the same
    rotation); "qwen3" rotates halves, as we do."""
    cfg, V, hs = model.cfg, model.cfg.vocab_size, model.cfg.head_dim

    def pairs(w, heads):                        # rows (heads * hs, C): [0, hs/2, 1, hs/2 + 1, ...] in each head
        return w.reshape(heads, 2, hs // 2, -1).transpose(1, 2).reshape(heads * hs, -1)
    out = [("token_embd.weight", model.tok_emb.weight[:V], "head")]
    for i, b in enumerate(model.trf_blocks):
        att, ff, p = b.att, b.ff, f"blk.{i}."
        q, k = att.W_query.weight, att.W_key.weight
        if not cfg.qk_norm:
            q, k = pairs(q, cfg.n_heads), pairs(k, cfg.n_kv_heads)
        out += [(p + "attn_norm.weight", b.norm1.weight, False), (p + "attn_q.weight", q, True),
                (p + "attn_k.weight", k, True), (p + "attn_v.weight", att.W_value.weight, True),
                (p + "attn_output.weight", att.out_proj.weight, True), (p + "ffn_norm.weight", b.norm2.weight, False),
                (p + "ffn_gate.weight", ff.gate.weight, True), (p + "ffn_up.weight", ff.up.weight, True),
                (p + "ffn_down.weight", ff.down.weight, True)]
        if cfg.qk_norm:
            out += [(p + "attn_q_norm.weight", att.q_norm.weight, False),
                    (p + "attn_k_norm.weight", att.k_norm.weight, False)]
    out.append(("output_norm.weight", model.final_norm.weight, False))
    if not cfg.tie_embeddings:
        out.append(("output.weight", model.out_head.weight[:V], "head"))
    return out


def _gpt2_header(w, model) -> None:
    import gguf

    cfg = model.cfg
    if cfg.vocab_size != 50257:
        raise ValueError(f"the GGUF tokenizer is GPT-2's 50,257 tokens; the model has {cfg.vocab_size}")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_feed_forward_length(4 * cfg.emb_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(model.trf_blocks[0].norm1.eps)
    tokens, merges = _gpt2_vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)


def _llama_header(w, model) -> None:
    cfg = model.cfg
    if cfg.rope_scaling:
        raise NotImplementedError("write_gguf: Llama 3's rope scaling (llama.cpp's rope_freqs tensor) is not written")
    if cfg.qkv_bias:
        raise NotImplementedError("write_gguf: attention biases are not written")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    # no tokenizer: token ids in, logits out (llama.cpp's "none" vocabulary of vocab_size ids) - ours has no Qwen or
    # Llama tokenizer to write, and neither tool's speed depends on it
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("none")


def write_gguf(model, path: str, qtype: str = "f32") -> str:
    """`model` (a float32 gptfast GPTModel, or a LlamaModel: Qwen3 / Llama) as a GGUF file llama.cpp loads; returns
    path."""
    import gguf

    from gptfast.model import GPTModel, LlamaModel

    if not isinstance(model, (GPTModel, LlamaModel)):
        raise NotImplementedError(f"write_gguf writes gptfast's GPTModel and LlamaModel, got {type(model).__name__}")
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    types = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}
    kind = types[qtype.split("+")[0]]
    head_kind = types[qtype.split("+")[-1]]
    llama = isinstance(model, LlamaModel)
    arch = ("qwen3" if model.cfg.qk_norm else "llama") if llama else "gpt2"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"gptfast {arch} {model.cfg.emb_dim}x{model.cfg.n_layers}")
    (_llama_header if llama else _gpt2_header)(w, model)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype.split("+")[0]])
    for name, t, quantizable in (_llama_tensors if llama else _gpt2_tensors)(model):
        data = t.detach().float().contiguous().numpy()
        k = head_kind if quantizable == "head" else kind
        if quantizable and k != gguf.GGMLQuantizationType.F32 and data.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(data, k), raw_dtype=k)   # (its byte shape: the writer converts)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def extra_buffers() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (AMX int8 tiles, weights repacked into interleaved
    layouts at load). On the 2-core Intel Xeon (AMX) with llama-cpp-python 0.3.36 a q8_0 or q4_0 model segfaults in its
    first decode with them (f32 runs), so they are off unless GPTFAST_LLAMA_CPP_EXTRA_BUFFERS=1 - where they work,
    turn them on: they are part of llama.cpp's speed."""
    return os.environ.get("GPTFAST_LLAMA_CPP_EXTRA_BUFFERS") == "1"


class LlamaCppRunner:
    """A GGUF file loaded by llama.cpp (llama-cpp-python), `threads` threads, greedy decoding one token a call."""

    def __init__(self, path: str, n_ctx: int, threads: int):
        import llama_cpp
        import llama_cpp.llama_cpp as lib

        defaults = lib.llama_model_default_params

        def model_params():                       # Llama() takes the defaults from here and sets its own fields
            p = defaults()
            p.use_extra_bufts = extra_buffers()
            return p
        lib.llama_model_default_params = model_params
        try:
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       n_batch=512, logits_all=False, verbose=False)
        finally:
            lib.llama_model_default_params = defaults
        self.vocab = self.llm.n_vocab()
        # the last position's logits as llama.cpp leaves them (Llama.scores is not filled without logits_all)
        self.last_logits = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1),
                                                         shape=(self.vocab,))

    def timed(self, prompt: torch.Tensor, n: int) -> tuple[float, float, torch.Tensor]:
        """(seconds to the first token, seconds for the rest, tokens (1, n)) of greedy decoding after prompt (1, T)."""
        llm = self.llm
        llm.reset()
        out = []
        t0 = time.perf_counter()
        llm.eval(prompt[0].tolist())
        first = None
        for _ in range(n):
            tok = int(np.argmax(self.last_logits()))
            out.append(tok)
            if first is None:
                first = time.perf_counter()
            if len(out) < n:
                llm.eval([tok])
        end = time.perf_counter()
        return first - t0, end - first, torch.tensor([out])


class BatchedBenchRunner:
    """llama.cpp's `llama-batched-bench` on a GGUF file: for a prompt (B, T), B sequences of T tokens processed
    together, then n decoding steps of B tokens, timed by llama.cpp itself (no Python in its loop; the process's
    start and the file's loading are outside its timings). It feeds a fixed token instead of sampling (a step's
    cost does not depend on which token comes), so it returns no tokens."""

    def __init__(self, path: str, n_ctx: int, threads: int, bin_dir: str):
        self.path, self.threads = path, threads
        self.exe = os.path.join(bin_dir, BATCHED_BENCH)

    def timed(self, prompt: torch.Tensor, n: int) -> tuple[float, float, None]:
        """(seconds of the prompts' processing, seconds of the steps after the first token, None) - the second
        scaled from llama.cpp's n steps to the n - 1 that gptfast's rows time (the first token comes from the prefill)."""
        B, T = prompt.shape
        ctx = -(-B * (T + n) // 256) * 256                      # every sequence's cells (its KV cache is shared)
        cmd = [self.exe, "-m", self.path, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(T), "-ntg", str(n),
               "-npl", str(B), "-t", str(self.threads), "-tb", str(self.threads), "--output-format", "jsonl"]
        # its libraries beside it (a build's bin folder copied elsewhere still loads its own ggml, not the build's)
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (os.path.dirname(self.exe), os.environ.get("LD_LIBRARY_PATH")) if p)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not rows:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{BATCHED_BENCH} failed (exit {done.returncode}): {' | '.join(tail)}\n  {' '.join(cmd)}")
        row = rows[-1]
        return row["t_pp"], row["t_tg"] * (n - 1) / n, None

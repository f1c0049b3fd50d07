"""llama.cpp beside gptfast on the same weights: a GGUF file written from our model, decoded by llama.cpp through
llama-cpp-python (an optional benchmark extra, never part of the tests' install: `pip install llama-cpp-python gguf`
builds llama.cpp from source for this CPU).

    from llama_cpp_peer import available, write_gguf, LlamaCppRunner

`write_gguf(model, path, "f32" | "q8_0" | "q4_0")` writes a GPT-2 model (gptfast's GPTModel) as llama.cpp's "gpt2"
architecture with the `gguf` package's writer and quantizers: the tensor names and metadata keys of the GGUF
format, GPT-2's BPE (the vocabulary and merges gptfast ships) as the tokenizer; the 2-D weights in the chosen type
(q8_0: 8 bits and a scale a block of 32 - 8.5 bits a weight; q4_0: 4.5 bits), norms, biases and positions in f32.
`LlamaCppRunner(path).timed(prompt_ids, n)` decodes greedily, one token per call as gptfast's loop does, and returns
(seconds to the first token, seconds for the rest, tokens).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

GGUF_TYPES = ("f32", "q8_0", "q4_0")


def available() -> str | None:
    """None if llama-cpp-python and gguf import here, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install llama-cpp-python gguf: an optional benchmark extra)"
    return None


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
    """(GGUF name, tensor, quantizable) of a float GPTModel, in llama.cpp's "gpt2" names; Q, K and V stacked."""
    V = model.cfg.vocab_size
    out = [("token_embd.weight", model.tok_emb.weight[:V], True), ("position_embd.weight", model.pos_emb.weight, False)]
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
        out.append(("output.weight", model.out_head.weight[:V], True))
    return out


def write_gguf(model, path: str, qtype: str = "f32") -> str:
    """`model` (a float32 gptfast GPTModel) as a GGUF file llama.cpp loads; returns path."""
    import gguf

    from gptfast.model import GPTModel

    if not isinstance(model, GPTModel):
        raise NotImplementedError("write_gguf writes GPT-2 models (gptfast's GPTModel) so far")
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {GGUF_TYPES}, got {qtype!r}")
    cfg = model.cfg
    if cfg.vocab_size != 50257:
        raise ValueError(f"the GGUF tokenizer is GPT-2's 50,257 tokens; the model has {cfg.vocab_size}")
    kind = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_name(f"gptfast {cfg.emb_dim}x{cfg.n_layers}")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_feed_forward_length(4 * cfg.emb_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(model.trf_blocks[0].norm1.eps)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype])
    tokens, merges = _gpt2_vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)
    for name, t, quantizable in _gpt2_tensors(model):
        data = t.detach().float().contiguous().numpy()
        if quantizable and kind != gguf.GGMLQuantizationType.F32 and data.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)   # (its byte shape: the writer converts)
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

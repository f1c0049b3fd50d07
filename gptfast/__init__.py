"""gptfast: a GPT-2-style language model from scratch, made fast by fused kernels.

Pipeline: `gptfast.data` (load text, windows, loaders) -> `gptfast.tokenizer` -> `gptfast.model`
(GPTModel, whose LayerNorm / GELU / attention run through `gptfast.ops` backends) ->
`gptfast.generate` and `gptfast.training`.
"""
__version__ = "0.1.0"

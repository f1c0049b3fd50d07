"""gptfast: a GPT-2-style language model from scratch, made fast by fused kernels.

Pipeline: `gptfast.data` (load text, windows, loaders) -> `gptfast.tokenizer` -> `gptfast.model`
(GPTModel, whose LayerNorm / GELU / attention run through `gptfast.ops` backends) ->
`gptfast.generate` and `gptfast.training`. `gptfast.quantize(model, "int8" | "bf16")` makes a trained
model's weights smaller and its decoding faster (gptfast/model/quantize.py).
"""
__version__ = "0.1.0"


def __getattr__(name):
    # `gptfast.quantize` without importing torch and the model at `import gptfast`
    if name == "quantize":
        from .model.quantize import quantize

        return quantize
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")

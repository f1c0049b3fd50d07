"""Weight-only quantization for inference: the linear layers' weights stored in fewer bytes.

Decoding one token reads every weight once, so its speed is the speed at which the weights stream
from memory: GPT-2 124M reads ~496 MB a token in float32, half that in bfloat16, a quarter in int8.
`quantize(model, "int8" | "bf16")` replaces every linear layer of the blocks and the LM head:

- int8: symmetric, one scale per output row (the row's largest |weight| / 127), so
  weight ~= q * scale with q in [-127, 127]; the error of a weight is at most scale / 2.
- bf16: the weights rounded to bfloat16 (8 bits of mantissa); the math stays float32.
- w8a8: int8's weights, and each row of activations quantized to int8 too (per row, on the fly) so that the
  products are integer dot products (`ops.linear_w8a8`): faster where decoding is compute-bound (a batch of
  sequences), at the price of the activations' rounding (benchmarks/NOTES.md measures both).
- int4 / int4-g64: the blocks' weights in 4 bits, symmetric in groups of 32 (64) along K with a float32 scale a
  group (w ~= q * scale, q in [-7, 7]; 5 bits a weight with the scales, 4.5 for groups of 64), two a byte
  (`pack_int4`), activations quantized to int8 per row as in w8a8 (`ops.linear_int4`). The LM head (and so a tied
  embedding) stays w8a8: it is the layer most sensitive to rounding, and a tenth of GPT-2's weights.

Each block's Q, K and V projections become one stacked layer (`att.W_qkv`, rows Q then K then V;
per-row scales make that the same quantization as three layers): one weight read and one call a
token instead of three. Activations, LayerNorm, attention and the KV cache keep the model's dtype; the products run through
`ops.linear_int8` / `ops.linear_bf16` (our CPU kernel widens each weight in registers; no float32
copy of the weights exists). A tied embedding shares the LM head's quantized rows: looking up a
token dequantizes its row. The model is for inference from then on (training it raises).

gpt.py and llama.py know nothing of this: the model becomes a `QuantizedGPTModel` / `QuantizedLlamaModel` (its
loss takes the quantized head's logits, its forward refuses training) and each GPT-2 attention a
`StackedQKVAttention` (its `queries_keys_values` hook reads the stacked layer; a Llama block keeps its three
projections, of different widths under grouped-query attention); parameter and buffer names stay those of the
float model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.linear_int4 import pack_int4, padded_k, unpack_int4
from .base import LanguageModel
from .gpt import CausalSelfAttention, GPTModel

QUANTIZATION_MODES = ("none", "bf16", "int8", "w8a8", "int4", "int4-g64")
INT8_MODES = ("int8", "w8a8")                                # int8 weights with per-row scales (the same tensors)
INT4_GROUPS = {"int4": 32, "int4-g64": 64}                   # 4-bit modes: weights a scale covers along K
__all__ = ["QUANTIZATION_MODES", "quantize", "prepare_quantized", "quantization_of", "quantize_int8_rows",
           "WeightOnlyLinear", "QuantizedEmbedding", "QuantizedModel", "QuantizedGPTModel", "quantized_class",
           "StackedQKVAttention", "pack_int4", "unpack_int4"]


def quantize_int8_rows(weight: torch.Tensor, rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (q int8 (N, K), scales float32 (N,)): symmetric per row, scale = absmax / 127.
    An all-zero row gets scale 1 (q = 0), not a division by zero. Rows go in chunks, so the
    temporaries stay in cache (GPT-2 124M: ~0.3 s on 2 cores)."""
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows_per_chunk):
        chunk = w[start:start + rows_per_chunk].float()
        lo, hi = torch.aminmax(chunk, dim=1)
        absmax = torch.maximum(-lo, hi)                           # (rows,)
        s = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        scales[start:start + rows_per_chunk] = s
        q[start:start + rows_per_chunk] = torch.round(chunk / s.unsqueeze(1)).clamp_(-127, 127)
    return q, scales


class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight (out, in) is int8 (with `scales` (out,); mode "int8", or "w8a8" with the
    activations quantized too), 4-bit (mode "int4"/"int4-g64": packed (out, padded in / 2) uint8 with `scales`
    (out, groups)) or bfloat16, kept as buffers: nothing here is trained."""

    def __init__(self, in_features: int, out_features: int, mode: str, bias: bool = True,
                 backend: str | None = None, device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if mode not in ("int8", "w8a8", "bf16", *INT4_GROUPS):
            raise ValueError(f"WeightOnlyLinear mode must be one of int8, w8a8, bf16, int4, int4-g64, got {mode!r}")
        self.in_features, self.out_features, self.mode, self.backend = in_features, out_features, mode, backend
        if mode in INT4_GROUPS:
            Kp = padded_k(in_features)
            self.register_buffer("weight", torch.empty(out_features, Kp // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(out_features, Kp // INT4_GROUPS[mode], dtype=torch.float32,
                                                       device=device))
        else:
            dtype = torch.int8 if mode in INT8_MODES else torch.bfloat16
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device)
                                 if mode in INT8_MODES else None)
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, convert: bool = True) -> "WeightOnlyLinear":
        """The quantized twin of `linear` (its weights converted; with convert=False left empty, to be
        filled by load_state_dict)."""
        return cls.from_weights(linear.weight, linear.bias, mode, getattr(linear, "backend", None), convert)

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, backend: str | None = None,
                     convert: bool = True) -> "WeightOnlyLinear":
        """The quantized layer for weight (out, in) and bias (out,) or None."""
        new = cls(weight.shape[1], weight.shape[0], mode, bias=bias is not None, backend=backend, device=weight.device,
                  bias_dtype=weight.dtype)
        if convert:
            with torch.no_grad():
                if mode in INT8_MODES or mode in INT4_GROUPS:
                    q, scales = quantize_int8_rows(weight) if mode in INT8_MODES else \
                        pack_int4(weight, INT4_GROUPS[mode])
                    new.weight.copy_(q)
                    new.scales.copy_(scales)
                else:
                    new.weight.copy_(weight.detach())
                if bias is not None:
                    new.bias.copy_(bias.detach())
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights this layer multiplies by, as a (out, in) tensor of `dtype`."""
        if self.mode in INT4_GROUPS:
            return unpack_int4(self.weight, self.scales, self.in_features, dtype)
        if self.mode in INT8_MODES:
            return self.weight.to(dtype) * self.scales.to(dtype).unsqueeze(1)
        return self.weight.to(dtype)

    def forward(self, x):                                        # (..., in) -> (..., out)
        if self.mode == "w8a8":
            return ops.linear_w8a8(x, self.weight, self.scales, self.bias, backend=self.backend)
        if self.mode in INT4_GROUPS:
            return ops.linear_int4(x, self.weight, self.scales, self.bias, backend=self.backend)
        if self.mode == "int8":
            return ops.linear_int8(x, self.weight, self.scales, self.bias, backend=self.backend)
        return ops.linear_bf16(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, " \
               f"bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """The token embedding of a model whose LM head is tied to it and quantized: token t's vector is
    row t of the head's weights, dequantized when looked up (no second, float32 copy of the matrix).
    Holds no tensors of its own (the head's are saved once, under out_head.*)."""

    def __init__(self, head: WeightOnlyLinear, dtype: torch.dtype):
        super().__init__()
        self._head = [head]                                      # a list: not a submodule, not saved twice
        self.dtype = dtype

    def forward(self, idx):                                      # (B, T) -> (B, T, C)
        head = self._head[0]
        rows = F.embedding(idx, head.weight).to(self.dtype)
        if head.mode in INT8_MODES:
            rows = rows * F.embedding(idx, head.scales.unsqueeze(1)).to(self.dtype)
        return rows


class StackedQKVAttention(CausalSelfAttention):
    """A quantized block's attention: Q, K and V from one stacked layer `W_qkv` (rows Q, then K, then V)."""

    def queries_keys_values(self, x):                            # (B, T, C) -> 3 x (B, nh, T, hs)
        return tuple(self.split_heads(t) for t in self.W_qkv(x).split(x.shape[-1], dim=-1))


class QuantizedModel:
    """What a model becomes after `quantize` (mixed into its class): `quantization` says how; inference only."""

    quantization: str

    def forward(self, idx, targets=None, **kwargs):
        if self.training:
            raise RuntimeError(f"this model's weights are quantized ({self.quantization}): it is for inference only "
                               "(call model.eval()); train the float32 model and quantize it afterwards")
        return super().forward(idx, targets, **kwargs)

    def lm_head_loss(self, x, targets):
        """The quantized head's logits, then the loss (the fused LM head + loss reads float weights)."""
        logits = self.out_head(x).flatten(0, 1)                  # (B*T, V)
        return ops.cross_entropy(logits, targets.flatten(), backend=self.cfg.backend)


_QUANTIZED_CLASSES: dict[type, type] = {}


def quantized_class(cls: type) -> type:
    """cls with QuantizedModel mixed in (one class per model class: QuantizedGPTModel, QuantizedLlamaModel)."""
    if cls not in _QUANTIZED_CLASSES:
        _QUANTIZED_CLASSES[cls] = type(f"Quantized{cls.__name__}", (QuantizedModel, cls), {"__module__": __name__})
    return _QUANTIZED_CLASSES[cls]


QuantizedGPTModel = quantized_class(GPTModel)


def quantization_of(model) -> str | None:
    """The quantization mode of a quantized model ("int8", "w8a8", "int4", ...), None for any other."""
    return getattr(model, "quantization", None)


def _linears(model: GPTModel):
    """(parent module, attribute name, layer) of every linear layer of the blocks, then the LM head."""
    for block in model.trf_blocks:
        for parent in (block.att, block.ff):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    yield parent, name, child
    yield model, "out_head", model.out_head


def _stacked_qkv(att) -> tuple[torch.Tensor, torch.Tensor | None]:
    """att's Q, K and V projections as one (3C, C) weight and (3C,) bias, rows in that order: per-row
    quantization of the stack is that of each part, and decoding makes one call instead of three."""
    parts = (att.W_query, att.W_key, att.W_value)
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    return weight, bias


def _replace(model: GPTModel, mode: str, convert: bool) -> GPTModel:
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANTIZATION_MODES)}")
    if not isinstance(model, LanguageModel):
        raise TypeError(f"quantize takes a gptfast GPTModel or LlamaModel, got {type(model).__name__}")
    if mode == "none":
        return model
    if quantization_of(model):
        raise ValueError(f"the model is already quantized ({model.quantization})")
    dtype = model.dtype
    for block in model.trf_blocks if isinstance(model, GPTModel) else ():   # GPT-2: Q, K, V as one layer
        att = block.att
        weight, bias = _stacked_qkv(att)
        del att.W_query, att.W_key, att.W_value
        att.__class__ = StackedQKVAttention                      # the same module, now reading W_qkv
        att.W_qkv = WeightOnlyLinear.from_weights(weight, bias, mode, att.backend, convert)
    for parent, name, layer in list(_linears(model)):
        layer_mode = "w8a8" if mode in INT4_GROUPS and parent is model else mode   # (the LM head of a 4-bit model)
        setattr(parent, name, WeightOnlyLinear.from_linear(layer, layer_mode, convert))
    if model.cfg.tie_embeddings:
        model.tok_emb = QuantizedEmbedding(model.out_head, dtype)
    model.requires_grad_(False)                                  # what is left (LayerNorms, positions) is frozen too
    model.__class__ = quantized_class(type(model))               # the same module: its loss and its training guard
    model.quantization = mode
    return model.eval()


@torch.no_grad()
def quantize(model: GPTModel, mode: str) -> GPTModel:
    """Quantize `model`'s linear layers in place ("int8", "w8a8", "int4", "int4-g64", "bf16"; "none" leaves it as
    it is) and
    return it, in eval mode, for inference only."""
    return _replace(model, mode, convert=True)


def prepare_quantized(model: GPTModel, mode: str) -> GPTModel:
    """`model` with the quantized layers of `mode` in place but their weights not yet set: the shape
    a quantized model's state dict loads into (reading a saved quantized model)."""
    return _replace(model, mode, convert=False)

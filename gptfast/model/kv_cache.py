"""The KV cache, and the one-token decoding step it runs.

Generating token t + 1 needs every earlier token's keys and values, which do not change once computed: keep
them (the cache) and a decoding step costs one position's work instead of the whole window's. Static shapes:
allocated once for the full context length.

A step of one position is also where our CPU kernels fuse a whole block into one call (`ops.decode_block`:
the block's LayerNorms, linear layers, cache write, attention and GELU, threads meeting at barriers instead of
~12 op calls, bit-for-bit the op-by-op results; `ops.decode_block_llama` for a Llama/Qwen3 block). `KVCache.run_block` takes that path where the backend has
it (`ops.fuses_decode_block`) and autograd does not need the result; anything else runs the block as written
in gpt.py.
"""
from __future__ import annotations

import torch

from .. import ops

__all__ = ["KVCache", "LayerKV", "decode_weights", "decode_weights_llama"]


class LayerKV:
    """One layer's preallocated key/value cache: (B, nh, context_length, hs) each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions start_pos.. and return every position so far,
        (B, nh, start_pos + T, hs) each (narrow: cheaper than slicing, per token)."""
        T = k.shape[2]
        self.k.narrow(2, start_pos, T).copy_(k)
        self.v.narrow(2, start_pos, T).copy_(v)
        return self.k.narrow(2, 0, start_pos + T), self.v.narrow(2, 0, start_pos + T)


class KVCache:
    """Keys and values of every layer for the positions already seen (up to `length`). `GPTModel.forward(idx,
    cache=cache, start_pos=start_pos)` writes positions start_pos onwards. `fused`: run one-token steps as one op for
    the whole model (`run_model`), else one op per block (`run_block`), where the backend has them; "blocks": one op
    per block only; False: op by op (to compare - the results are the same)."""

    def __init__(self, cfg, batch_size: int, device=None, dtype=torch.float32, fused: bool | str = True,
                 length: int | None = None):
        # grouped-query attention caches n_kv_heads heads, n_heads / n_kv_heads times fewer bytes; `length`
        # positions (default the whole context: Qwen3's 40,960 would be 2.3 GB a sequence - generate asks for what
        # it will use)
        length = min(length or cfg.context_length, cfg.context_length)
        shape = (batch_size, getattr(cfg, "n_kv_heads", cfg.n_heads), length, cfg.head_dim)
        self.layers = [LayerKV(torch.zeros(shape, device=device, dtype=dtype),
                               torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layers)]
        self.batch_size = batch_size
        self.fused = fused
        self.step = None                     # (what it was bound for, the bound ops.DecodeStep or None): run_model

    def run_model(self, model, x: torch.Tensor, start_pos: int, rope: tuple | None = None) -> torch.Tensor | None:
        """The logits (B, 1, V) of the whole one-token step of `model` (its blocks, final norm and LM head) on x
        (B, 1, C), the embedded token, in one call (`ops.decode_model`) - or None where that does not apply (more
        than one position, training, autograd, a backend without it): the model then runs its blocks one by one.
        `rope`: a Llama model's (cos, sin) of the position. The first step binds the model's weights to the cache
        (`ops.DecodeStep`: gathered and checked once, not once a token); a different model, backend, batch shape
        or grad mode binds again. Replacing a bound model's layers in place (e.g. quantize) needs a new cache."""
        if self.fused is not True or x.shape[1] != 1 or model.training:
            return None
        key = (model, model.out_head, model.trf_blocks[0].backend, tuple(x.shape), x.dtype, x.device,
               torch.is_grad_enabled(), rope is None)
        if self.step is None or self.step[0] != key:
            self.step = (key, self.bind_model(model, x, rope))
        step = self.step[1]
        return None if step is None else step(x, start_pos, rope)

    def bind_model(self, model, x: torch.Tensor, rope: tuple | None) -> ops.DecodeStep | None:
        """model's weights and these caches as one fused step (None where it does not fuse)."""
        blocks = [(decode_weights_llama if rope is not None else decode_weights)(b) for b in model.trf_blocks]
        norm, head = model.final_norm, model.out_head
        if any(b is None or b.eps != norm.eps or b.int8_activations != activations_quantized([head]) for b in blocks) \
                or torch.is_grad_enabled() and head.weight.requires_grad:
            return None
        weights = ops.ModelWeights(tuple(blocks), norm.weight, getattr(norm, "bias", None),
                                   ops.LinearWeights(head.weight, getattr(head, "scales", None), head.bias))
        ks, vs = [kv.k for kv in self.layers], [kv.v for kv in self.layers]
        backend = model.trf_blocks[0].backend
        if not ops.fuses_decode_model(x, weights, ks, backend=backend):
            return None
        return ops.DecodeStep(x, weights, ks, vs, rope, backend=backend)

    def run_block(self, i: int, block, x: torch.Tensor, start_pos: int, **extra) -> torch.Tensor:
        """Block i on x (B, T, C) at positions start_pos.., against (and into) layer i's cache (`extra`: what
        the block takes besides, e.g. a Llama block's rotary angles)."""
        kv = self.layers[i]
        if self.fused and x.shape[1] == 1 and not block.training:   # one position: one call, where it fuses
            if "rope" in extra:                                  # a Llama/Qwen3 block: the position's angles too
                weights = decode_weights_llama(block)
                if weights is not None and ops.fuses_decode_block_llama(x, weights, kv.k, backend=block.backend):
                    return ops.decode_block_llama(x, weights, kv.k, kv.v, start_pos, *extra["rope"],
                                                  backend=block.backend)
            else:
                weights = decode_weights(block)
                if weights is not None and ops.fuses_decode_block(x, weights, kv.k, backend=block.backend):
                    return ops.decode_block(x, weights, kv.k, kv.v, start_pos, backend=block.backend)
        return block(x, kv, start_pos, **extra)


def activations_quantized(layers) -> bool | None:
    """Whether these layers quantize their activations too (quantize.py's "w8a8" and 4-bit modes: the fused steps
    then do as ops.linear_w8a8 / ops.linear_int4 do); None where some do and some do not (the fused steps take one
    way for all)."""
    modes = {getattr(m, "mode", None) in ("w8a8", "int4", "int4-g64") for m in layers}
    return None if len(modes) > 1 else modes.pop()


def decode_weights(block) -> ops.BlockWeights | None:
    """A TransformerBlock's tensors as ops.decode_block reads them (None where autograd would need the
    result: the fused block has no backward). A quantized block's stacked Q/K/V layer is passed as one."""
    att, ff = block.att, block.ff
    if getattr(block.norm1, "bias", None) is None:               # not GPT-2's block (a Llama block: RMSNorm)
        return None
    if torch.is_grad_enabled() and block.norm1.weight.requires_grad or block.norm1.eps != block.norm2.eps:
        return None
    stacked = getattr(att, "W_qkv", None)                        # quantize.py's one layer for Q, K and V
    qkv = (stacked,) if stacked is not None else (att.W_query, att.W_key, att.W_value)
    q8 = activations_quantized([*qkv, att.out_proj, ff.fc, ff.proj])
    if q8 is None:
        return None

    def layer(m):                                                # nn.Linear, or a quantized WeightOnlyLinear
        return ops.LinearWeights(m.weight, getattr(m, "scales", None), m.bias)
    return ops.BlockWeights(block.norm1.weight, block.norm1.bias, tuple(layer(m) for m in qkv), layer(att.out_proj),
                            block.norm2.weight, block.norm2.bias, layer(ff.fc), layer(ff.proj), block.norm1.eps, q8)


def decode_weights_llama(block) -> ops.LlamaBlockWeights | None:
    """A LlamaBlock's tensors as ops.decode_block_llama reads them (None where autograd would need the result, or
    where its norms differ in eps)."""
    att, ff = block.att, block.ff
    if torch.is_grad_enabled() and block.norm1.weight.requires_grad:
        return None
    norms = [block.norm1, block.norm2] + ([att.q_norm, att.k_norm] if att.q_norm is not None else [])
    q8 = activations_quantized([att.W_query, att.W_key, att.W_value, att.out_proj, ff.gate, ff.up, ff.down])
    if len({n.eps for n in norms}) != 1 or q8 is None:
        return None

    def layer(m):                                                # our Linear, or a quantized WeightOnlyLinear
        return ops.LinearWeights(m.weight, getattr(m, "scales", None), m.bias)
    return ops.LlamaBlockWeights(block.norm1.weight, layer(att.W_query), layer(att.W_key), layer(att.W_value),
                                 layer(att.out_proj), block.norm2.weight, layer(ff.gate), layer(ff.up),
                                 layer(ff.down), None if att.q_norm is None else att.q_norm.weight,
                                 None if att.k_norm is None else att.k_norm.weight, block.norm1.eps, q8)

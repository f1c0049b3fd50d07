"""`attn_implementation="gptfast"`: our causal attention behind transformers' own extension point.

transformers looks an attention function up by name (`AttentionInterface`) in every attention layer, and
a mask builder by the same name (`AttentionMaskInterface`) once per forward. Both are registered here:

- the mask builder returns None when the mask is the plain causal one - every query sees every key up to
  its own position, the queries being the last positions of the keys (a prompt, a KV-cache decoding step,
  training without padding) - and otherwise builds transformers' SDPA boolean mask;
- the attention function runs `ops.causal_attention` (the backend: the layer's `gptfast_backend`, set by
  `apply_gptfast`, else gptfast's default) on a None mask, with the layer's attention dropout in training.
  What the op cannot do goes to transformers' own SDPA attention, with a one-time warning that says why:
  a mask with holes (padding, a static cache, packed sequences, a custom 4D mask), cross-attention, head
  masks; `output_attentions=True` goes to the model's eager attention, the one
  path that forms the weights. Any model that calls transformers' attention interface can use it (the
  GPT-2 patches of gpt2.py are GPT-2 only).
"""
from __future__ import annotations

import sys
import warnings

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from gptfast import ops

try:   # transformers 5 pops output_attentions before the layers and collects the weights through hooks
    from transformers.utils.output_capturing import _active_collector
except ImportError:                                   # (private: other versions may not have it)
    _active_collector = None

NAME = "gptfast"


class GptfastFallbackWarning(UserWarning):
    """An attention call that gptfast hands back to transformers (said once per reason)."""


_warned: set[str] = set()


def _warn_once(reason: str, target: str) -> None:
    if reason in _warned or torch.compiler.is_compiling():
        return
    _warned.add(reason)
    warnings.warn(f"attn_implementation='gptfast' cannot take {reason}: such calls run transformers' '{target}' "
                  "attention instead (the same results at its speed). Said once per reason.",
                  GptfastFallbackWarning, stacklevel=4)


def _attentions_requested(module, kwargs: dict) -> bool:
    """Whether this forward must return attention weights (output_attentions=True)."""
    if kwargs.get("output_attentions"):
        return True
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    if _active_collector is None or torch.compiler.is_compiling():   # outputs are recorded in eager mode only
        return False
    collecting = _active_collector.get()
    return bool(collecting) and ("attentions" in collecting or "cross_attentions" in collecting)


def fallback_reason(module, query: torch.Tensor, key: torch.Tensor, attention_mask, is_causal, kwargs: dict):
    """Why this call cannot run on ops.causal_attention (None: it can)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "cross-attention (not causal)"
    if attention_mask is not None:
        return ("an attention mask other than the plain causal one (padding in attention_mask, a static cache, "
                "packed sequences or a custom 4D mask)")
    if kwargs.get("head_mask") is not None:
        return "a head_mask"
    for name in ("position_bias", "softcap", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            return f"{name}"
    if key.shape[1] < 1 or query.shape[1] % key.shape[1]:
        return "key/value heads that do not divide the query heads"
    if query.shape[-2] > key.shape[-2]:
        return "more queries than keys"
    return None


def _explicit_causal_mask(module, query: torch.Tensor, key: torch.Tensor, attention_mask, is_causal):
    """The mask to hand a fallback. Our mask builder returns None for the plain causal mask with the queries
    at the *last* key positions; transformers' attentions read None as "no mask" (eager) or as causal with
    the queries at the *first* positions (SDPA, when Tq > 1): the mask is spelled out as a boolean
    (1, 1, Tq, Tk) tensor for them."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or not causal:
        return attention_mask
    tq, tk = query.shape[-2], key.shape[-2]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(diagonal=tk - tq)
    return keep.view(1, 1, tq, tk)


def gptfast_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: query (B, H, Tq, D), key and value (B, Hk, Tk, D) ->
    (output (B, Tq, H, D), weights or None)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is not None and _attentions_requested(module, kwargs):
        _warn_once("output_attentions=True (the fused kernel never forms the attention weights)", "eager")
        mask = _explicit_causal_mask(module, query, key, attention_mask, is_causal)
        if mask is not None and mask.dtype == torch.bool:            # eager adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    reason = fallback_reason(module, query, key, attention_mask, is_causal, kwargs)
    if reason is not None:
        _warn_once(reason, "sdpa")
        mask = _explicit_causal_mask(module, query, key, attention_mask, is_causal)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, dropout=dropout,
                                              scaling=scaling, is_causal=is_causal, **kwargs)
    out = ops.causal_attention(query, key, value, dropout_p=dropout, scale=scaling,
                               backend=getattr(module, "gptfast_backend", None))     # (B, H, Tq, D)
    return out.transpose(1, 2), None


def _plain_causal(q_length: int, kv_length: int, q_offset, kv_offset, attention_mask, local_size) -> bool:
    """Whether the mask would be plain causal with the queries at the last positions (what our op computes)."""
    if local_size is not None or isinstance(q_offset, torch.Tensor) or kv_offset != 0:
        return False                                  # a sliding window, or a static cache's fixed length
    if q_offset + q_length != kv_length:
        return False
    if attention_mask is None:
        return True
    if torch.compiler.is_compiling() or attention_mask.ndim != 2 or attention_mask.shape[-1] != kv_length:
        return False                                  # reading the mask's values would break the graph
    return bool(attention_mask.all())                 # no padding


def gptfast_mask(*args, **kwargs):
    """transformers' mask-builder contract (see masking_utils.sdpa_mask): None for the plain causal mask,
    else SDPA's boolean (B, 1, Tq, Tk) mask, which sends the call to the SDPA fallback."""
    if kwargs.get("allow_is_causal_skip", True) and not args and _plain_causal(
            kwargs["q_length"], kwargs["kv_length"], kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0),
            kwargs.get("attention_mask"), kwargs.get("local_size")):
        return None
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


def register() -> None:
    """Make "gptfast" a name transformers knows (done on importing gptfast.integrations.transformers)."""
    AttentionInterface.register(NAME, gptfast_attention_forward)
    AttentionMaskInterface.register(NAME, gptfast_mask)

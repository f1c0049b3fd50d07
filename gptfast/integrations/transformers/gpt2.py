"""gptfast's kernels in transformers' GPT-2, Liger-style: `apply_gptfast(model)` patches a model in place,
`apply_gptfast_to_gpt2()` every GPT-2 model built afterwards (from_pretrained included).

What changes - the parameters, their names and the saved files do not:
- attention: the layers run on attn_implementation "gptfast" (attention.py);
- layer_norm: every nn.LayerNorm computes through ops.layer_norm (the module's class becomes a subclass:
  same weight and bias, same state-dict keys);
- gelu: the MLP's tanh GELU (activation_function "gelu_new" / "gelu_pytorch_tanh") is ops.gelu;
- loss: GPT2LMHeadModel's forward, when given labels, computes HF's loss (labels shifted inside,
  ignore_index -100, `num_items_in_batch` for gradient accumulation) through ops.linear_cross_entropy,
  the LM head fused with the loss, so that training never holds the (B, T, V) logits: in training mode
  the output's logits are None unless `skip_logits=False` is passed. In eval mode (or skip_logits=False)
  the logits are computed and the loss goes through ops.cross_entropy.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.gpt2 import modeling_gpt2

from gptfast import ops

from .attention import NAME

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")     # transformers' names for GELU's tanh approximation
SUPPORTED = ("transformers' GPT-2 models (model_type 'gpt2': GPT2LMHeadModel, GPT2Model and the other GPT2* heads), "
             "Llama and Qwen3 models (model_type 'llama', 'qwen3': llama.py)")


@dataclass
class GptfastPatch:
    """What apply_gptfast changed."""
    backend: str
    attention_layers: int = 0
    layer_norms: int = 0
    gelus: int = 0
    rms_norms: int = 0
    swiglus: int = 0
    rope: bool = False
    fused_loss: bool = False
    left_alone: list[str] = field(default_factory=list)


class GptfastLayerNorm(nn.LayerNorm):
    """nn.LayerNorm through ops.layer_norm (a patched module's class; parameters and keys unchanged)."""
    gptfast_backend: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)               # autocast runs LayerNorm in float32 as well
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=self.gptfast_backend)


class GptfastGELU(nn.Module):
    """GELU, tanh approximation, through ops.gelu."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.gptfast_backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu(x, backend=self.gptfast_backend)


def check_gpt2(model) -> None:
    if not isinstance(model, modeling_gpt2.GPT2PreTrainedModel) or model.config.model_type != "gpt2":
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise TypeError(f"apply_gptfast supports {SUPPORTED}; got {type(model).__name__}"
                        + (f" (model_type {kind!r})" if kind else ""))


def _patch_layer_norms(model, backend: str, patch: GptfastPatch) -> None:
    for name, m in model.named_modules():
        if not isinstance(m, nn.LayerNorm):
            continue
        if len(m.normalized_shape) != 1 or m.weight is None or m.bias is None:
            patch.left_alone.append(f"{name}: a LayerNorm without a 1-D weight and bias")
            continue
        m.__class__ = GptfastLayerNorm
        m.gptfast_backend = backend
        patch.layer_norms += 1


def _patch_gelus(model, backend: str, patch: GptfastPatch) -> None:
    activation = model.config.activation_function
    for name, m in model.named_modules():
        if not isinstance(m, modeling_gpt2.GPT2MLP):
            continue
        if activation not in TANH_GELUS:
            patch.left_alone.append(f"{name}.act: activation_function {activation!r} is not the tanh GELU")
            continue
        m.act = GptfastGELU(backend)
        patch.gelus += 1


def _patch_attention(model, backend: str, patch: GptfastPatch, layer_class: type = modeling_gpt2.GPT2Attention) -> None:
    if getattr(model.config, "_attn_implementation", None) != NAME:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(NAME)
        else:                                         # transformers versions without the setter
            model.config._attn_implementation = NAME
    for m in model.modules():
        if isinstance(m, layer_class):
            m.gptfast_backend = backend
            patch.attention_layers += 1


def apply_gptfast(model, backend: str = "auto", attention: bool = True, layer_norm: bool = True,
                  gelu: bool = True, loss: bool = True, rms_norm: bool = True, swiglu: bool = True,
                  rope: bool = True) -> GptfastPatch:
    """Run `model` (a transformers GPT-2, Llama or Qwen3 model) on gptfast's kernels, computed by `backend` (any
    gptfast backend: reference, torch, extension, triton, auto). Patches in place, returns what it changed.
    GPT-2: attention, layer_norm, gelu, loss; Llama/Qwen3 (llama.py): attention, rms_norm, swiglu, rope, loss."""
    from .llama import MODEL_TYPES, apply_gptfast_llama

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind in MODEL_TYPES and isinstance(model, nn.Module):
        ops.get_backend(backend)
        return apply_gptfast_llama(model, GptfastPatch(backend=backend), backend, attention, rms_norm, swiglu, rope,
                                   loss)
    check_gpt2(model)
    ops.get_backend(backend)                          # an unknown or unavailable backend: a clear error now
    patch = GptfastPatch(backend=backend)
    if attention:
        _patch_attention(model, backend, patch)
    if layer_norm:
        _patch_layer_norms(model, backend, patch)
    if gelu:
        _patch_gelus(model, backend, patch)
    if loss:
        if isinstance(model, modeling_gpt2.GPT2LMHeadModel):
            model.forward = types.MethodType(_fused_loss_forward(type(model).forward, backend), model)
            patch.fused_loss = True
        else:
            patch.left_alone.append(f"loss: {type(model).__name__} has no LM head (only GPT2LMHeadModel's is fused)")
    return patch


def causal_lm_loss(labels: torch.Tensor, *, hidden: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   logits: torch.Tensor | None = None, backend: str | None = None, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (loss_utils.ForCausalLMLoss), from the hidden states and the LM head
    weight (fused: no logits) or from the logits: labels shifted left, the last position ignored; the mean
    over the kept targets, or their sum / num_items_in_batch (0 when none is kept)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    device = (hidden if hidden is not None else logits).device
    shift_labels = shift_labels.to(device)
    if hidden is not None:
        mean = ops.linear_cross_entropy(hidden, weight, shift_labels, ignore_index, backend=backend)
    else:
        mean = ops.cross_entropy(logits.float(), shift_labels, ignore_index, backend=backend)
    if num_items_in_batch is None:
        return mean
    kept = (shift_labels != ignore_index).sum()
    total = torch.where(kept > 0, mean * kept, torch.zeros_like(mean))
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _fused_loss_forward(original, backend: str, output_class: type = CausalLMOutputWithCrossAttentions):
    """A CausalLM's forward (GPT2LMHeadModel's, LlamaForCausalLM's, ...) with the loss through gptfast (see the
    module docstring). Same signature as `original`, so that generate() and the Trainer, which inspect it, see
    what they expect."""
    sig = inspect.signature(original)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        skip_logits = kwargs.pop("skip_logits", None)
        bound = sig.bind(self, *args, **kwargs)
        named = dict(bound.arguments)
        extra = dict(named.pop(var_kw, {})) if var_kw else {}
        labels = named.pop("labels", None)
        if labels is None:
            return original(self, *args, **kwargs)
        named.pop("self")
        loss_kw = {k: extra.pop(k) for k in LOSS_KWARGS if k in extra}
        return_dict = extra.pop("return_dict", None)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        if not (self.training if skip_logits is None else skip_logits):
            out = original(self, **named, **extra, return_dict=True)           # logits, no loss
            loss = causal_lm_loss(labels, logits=out.logits, backend=backend, **loss_kw)
            out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})   # fields in their order
        else:
            named.pop("logits_to_keep", None)
            base = getattr(self, self.base_model_prefix)(**named, **extra, return_dict=True)   # transformer, model
            loss = causal_lm_loss(labels, hidden=base.last_hidden_state, weight=self.lm_head.weight,
                                  backend=backend, **loss_kw)
            fields = output_class.__dataclass_fields__
            out = output_class(loss=loss, logits=None,
                               **{k: v for k, v in base.items() if k != "last_hidden_state" and k in fields})
        return out if return_dict else out.to_tuple()

    return forward


_class_patch: dict = {}


def apply_gptfast_to_gpt2(backend: str = "auto", attention: bool = True, layer_norm: bool = True,
                          gelu: bool = True, loss: bool = True) -> None:
    """The class-level form: every GPT-2 model that transformers builds from now on (GPT2LMHeadModel(config),
    from_pretrained, ...) comes out of its constructor with apply_gptfast(model, ...) applied.
    `revert_gptfast_for_gpt2()` undoes it for models built afterwards."""
    ops.get_backend(backend)
    options = dict(backend=backend, attention=attention, layer_norm=layer_norm, gelu=gelu, loss=loss)
    cls = modeling_gpt2.GPT2PreTrainedModel
    original = _class_patch.get("post_init", cls.post_init)

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if type(self).post_init is post_init:          # not a model class that overrides post_init
            apply_gptfast(self, **options)
        return result

    _class_patch["post_init"] = original
    cls.post_init = post_init


def revert_gptfast_for_gpt2() -> None:
    """Undo apply_gptfast_to_gpt2 (models already built keep their patch)."""
    if "post_init" in _class_patch:
        modeling_gpt2.GPT2PreTrainedModel.post_init = _class_patch.pop("post_init")

"""Prefix keys/values through transformers' public `AttentionInterface`.

PEFT's prefix tuning passes the prefix as `past_key_values`, which transformers 5.x drops inside `generate()` for
LLaMA and T5 and refuses for BERT classification; concatenating rows at the k/v projections breaks the reshapes
(see shared notes). Instead, "eager" and "sdpa" are registered as wrapped attention functions: for an attention
module that carries a `gated_prefix` child with an active adapter they prepend the prefix keys/values, extend the
attention mask with the prefix columns (carrying log G_P) and pad T5's position_bias; every other call passes through
to the stock function unchanged. Other implementations (flash, flex) never reach the wrapper, so the attention module's
forward pre-hook refuses them instead of silently dropping the prefix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from peftlab.methods.unipelt.layers import PREFIX_CHILD, UniPELTPrefix

SUPPORTED_ATTENTION = ("eager", "sdpa")
_MARK = "_peftlab_unipelt_wrapper"


def _model_eager(module: nn.Module) -> Callable:
    """The model's own eager attention (each transformers model file defines `eager_attention_forward`)."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(
            f"{type(module).__name__} has no module-level eager_attention_forward; with peftlab's UniPELT loaded, "
            "use attn_implementation='sdpa' for this model"
        )
    return function


def _real_mask(
    mask: torch.Tensor | None, causal: bool, batch: int, q_len: int, k_len: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """The attention mask over the real keys as an additive float mask of shape (batch, 1 or heads, q_len, k_len)."""
    low = torch.finfo(dtype).min
    if mask is None:
        if causal and q_len > 1:
            # the model relied on is_causal (sdpa, no padding): build it, aligned to the last key (cached decoding)
            allowed = torch.arange(k_len, device=device)[None, :] <= (
                torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            )
            mask = torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(~allowed, low)[None, None]
        else:
            mask = torch.zeros(1, 1, q_len, k_len, dtype=dtype, device=device)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, low)
    else:
        mask = mask.to(dtype)
    return mask.expand(batch, mask.shape[1], q_len, k_len)


def _wrap(resolve: Callable[[nn.Module], Callable]) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        inner = resolve(module)
        prefix: UniPELTPrefix | None = getattr(module, PREFIX_CHILD, None)
        if prefix is None:
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        hidden, prefix.attention_input = prefix.attention_input, None
        name = prefix.active_prefix()
        if name is None or hidden is None:
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        kv = prefix.key_values(name).to(key.dtype)  # (2, L, kv_heads * head_dim)
        length = kv.shape[1]
        kv = kv.view(2, length, prefix.num_kv_heads, prefix.head_dim).transpose(1, 2)  # (2, heads, L, head_dim)
        key = torch.cat((kv[0].unsqueeze(0).expand(batch, -1, -1, -1), key), dim=2)
        value = torch.cat((kv[1].unsqueeze(0).expand(batch, -1, -1, -1), value), dim=2)
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        real = _real_mask(attention_mask, causal, batch, q_len, k_len, query.dtype, query.device)
        prefix_cols = torch.zeros(batch, real.shape[1], q_len, length, dtype=query.dtype, device=query.device)
        log_gate = prefix.log_gate(name, hidden, query.dtype)
        if log_gate is not None:
            prefix_cols = prefix_cols + log_gate
        mask = torch.cat((prefix_cols, real), dim=-1)
        if kwargs.get("position_bias") is not None:
            kwargs["position_bias"] = nn.functional.pad(kwargs["position_bias"], (length, 0))
        return inner(module, query, key, value, mask, *args, **kwargs)

    setattr(attention, _MARK, True)
    return attention


def install_attention_wrappers() -> None:
    """Register the wrapped "eager" and "sdpa" functions once per process (idempotent)."""
    current_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(current_sdpa, _MARK, False):
        return
    AttentionInterface.register("sdpa", _wrap(lambda module: current_sdpa))
    AttentionInterface.register("eager", _wrap(_model_eager))


def attention_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Hand the attention input (for the gate) to the prefix, and refuse implementations that would skip it."""
    prefix: UniPELTPrefix = getattr(module, PREFIX_CHILD)
    if prefix.active_prefix() is None:
        prefix.attention_input = None
        return
    implementation = module.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"UniPELT's prefix needs attn_implementation in {SUPPORTED_ATTENTION}; this model uses "
            f"{implementation!r}, which would run without the prefix. Load the model with "
            "attn_implementation='sdpa' (or 'eager')."
        )
    prefix.attention_input = args[0] if args else kwargs["hidden_states"]


def attention_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    """Fail loudly if the attention ran without passing through the wrapper (the prefix would be missing)."""
    prefix: UniPELTPrefix = getattr(module, PREFIX_CHILD)
    if prefix.attention_input is not None:
        prefix.attention_input = None
        raise RuntimeError(
            f"{type(module).__name__} computed attention without transformers' attention interface, so the UniPELT "
            "prefix was not applied (e.g. GPT-2 with reorder_and_upcast_attn=True under eager attention)"
        )

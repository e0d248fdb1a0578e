"""Prefix keys/values inside transformers' attention functions.

PEFT's prefix tuning passes the prefix as `past_key_values`, which transformers 5.x drops inside `generate()` for
LLaMA and T5 and refuses for BERT classification; concatenating rows at the k/v projections breaks the reshapes
(see shared notes). Instead, the "eager" and "sdpa" functions that a model's attention resolves through
`AttentionInterface.get_interface` are wrapped (`with_prefix`; installed process-wide in `peftlab.integration`): for
an attention module that carries a `gated_prefix` child with an active adapter the wrapper prepends the prefix
keys/values, extends the attention mask with the prefix columns (carrying log G_P) and pads T5's position_bias; every
other call goes to the very function the model resolved (for eager, the model's own), unchanged. Other
implementations (flash, flex) are not wrapped, so the attention module's forward pre-hook refuses them instead of
silently dropping the prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from peftlab.methods.unipelt.layers import PREFIX_CHILD, UniPELTPrefix

SUPPORTED_ATTENTION = ("eager", "sdpa")


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


@functools.cache
def with_prefix(inner: Callable) -> Callable:
    """`inner` (an attention function as transformers resolved it) with the UniPELT prefix for prefixed modules.

    Cached per function, so each resolution returns the same wrapper object.
    """

    @functools.wraps(inner)
    def attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
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

    return attention


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

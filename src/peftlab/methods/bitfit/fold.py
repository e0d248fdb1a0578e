"""Folding an inserted norm bias into the linear layers that consume the norm's output.

An RMSNorm (LLaMA, Mistral, Qwen) has no bias, so BitFit adds its delta b to the norm's output: y = g * x / rms(x) + b.
Where that output feeds ONLY linear layers, W(y + b) + c = Wy + (c + Wb): the delta is exactly a bias of each
consumer, which the stock architecture can hold (LLaMA's attention_bias / mlp_bias, Qwen2's q/k/v biases).

Which layers consume a norm's output is read from the modeling code per model_type, not traced: in these decoder
layers the residual stream takes the un-normed input, `input_layernorm`'s output goes only to the attention's q/k/v
projections and `post_attention_layernorm`'s only to the MLP's gate/up projections (transformers 5.24
modeling_llama/mistral/qwen2/qwen3.py). The final `norm` is not foldable: its output is the model's hidden state,
read by a bias-less LM head or task head and returned to the caller. Families with post-norms (Gemma 2, OLMo 2) feed
a norm's output into the residual stream, so they are deliberately not listed. tests/test_bitfit_fold.py traces
every listed family's forward to check the table against the code.

Tied weights do not matter (W b is computed per consumer and a bias belongs to one module), but a shared module does:
a consumer registered at several places also runs on other inputs, which would get W b too, and a shared norm feeds
the consumers of every place it sits at; neither is folded. A consumer must be a plain nn.Linear (the fold reads
its weight matrix; a quantized Linear4bit holds a packed one).
"""

from __future__ import annotations

from collections import Counter

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

_PRE_NORM_DECODER = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
# model_type -> {norm attribute name -> consumer paths relative to the norm's parent module}
NORM_CONSUMERS: dict[str, dict[str, tuple[str, ...]]] = dict.fromkeys(
    ("llama", "mistral", "qwen2", "qwen3"), _PRE_NORM_DECODER
)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def use_counts(model: nn.Module) -> Counter[int]:
    """How many places of the module tree each module object sits at (more than one: it is shared)."""
    counts: Counter[int] = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, BaseTunerLayer):  # its base layer is counted as its own child
            counts[id(module)] += 1
    return counts


def fold_plan(model: nn.Module, name: str, counts: Counter[int] | None = None) -> tuple[list[str], str | None]:
    """The consumers the bias of norm `name` folds into, or ([], the reason it cannot be folded)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = NORM_CONSUMERS.get(model_type)
    if table is None:
        known = ", ".join(sorted(NORM_CONSUMERS))
        return [], f"peftlab knows which linear layers consume norm outputs only for model_type {known}"
    parent, _, attribute = name.rpartition(".")
    if attribute not in table:
        return [], (
            f"in {model_type} a {attribute}'s output does not feed linear layers only (the final norm's is the "
            "model's hidden state, read by a head without a bias and returned); the foldable norms are "
            + ", ".join(f"{norm} -> {'/'.join(paths)}" for norm, paths in table.items())
        )
    counts = counts if counts is not None else use_counts(model)
    consumers = [f"{parent}.{path}" if parent else path for path in table[attribute]]
    for consumer in consumers:
        try:
            layer = _base(model.get_submodule(consumer))
        except AttributeError:
            return [], f"its consumer {consumer} does not exist in this model"
        if type(layer) is not nn.Linear:
            return [], f"its consumer {consumer} is a {type(layer).__name__}, not a plain Linear"
        if counts[id(layer)] > 1:
            return [], f"its consumer {consumer} is shared with other places of the model, which would get the bias too"
    if counts[id(_base(model.get_submodule(name)))] > 1:
        return [], "the norm is shared by several places of the model, whose outputs feed different layers"
    return consumers, None


def folded_contributions(model: nn.Module, folds: dict[str, tuple[torch.Tensor, list[str]]]) -> dict[str, torch.Tensor]:
    """consumer name -> the bias W @ b it gains from each folded norm delta b (summed, computed in float64)."""
    gained: dict[str, torch.Tensor] = {}
    for delta, consumers in folds.values():
        for consumer in consumers:
            weight = _base(model.get_submodule(consumer)).weight.detach()
            extra = weight.double() @ delta.detach().to(weight.device).double()
            gained[consumer] = gained[consumer] + extra if consumer in gained else extra
    return gained


def add_to_bias(layer: nn.Linear, extra: torch.Tensor) -> None:
    """layer.bias += extra, creating a zero bias first where the layer has none."""
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device))
    layer.bias.data = (layer.bias.data.double() + extra.to(layer.bias.device)).to(layer.bias.dtype)

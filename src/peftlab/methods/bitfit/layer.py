"""The BitFit tuner layer: a zero-initialised trainable bias delta added to the output of one wrapped layer.

For a layer that already has a bias, training the delta is exactly training that bias (output = Wx + b + delta);
for a bias-less layer it is the inserted bias the method calls for. Either way the outputs at step 0 are the base
model's, bit for bit, and merging is `bias += delta`.

Speed: for plain Linear, Conv1D and LayerNorm layers the delta is folded into the bias argument of the layer's own
kernel (F.linear(x, W, b + delta)), so no extra pass over the activations is made (stock BEFT adds the delta to
the output, and adding it in place would be slower still: those outputs are views, which autograd then copies).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

# Layer types whose forward adds `self.bias` last (and reads it even when it is None), so a delta can be merged into
# a bias created on the fly, and (for exactly these types) folded into the bias argument of their kernel.
_CAN_HOLD_BIAS = (nn.Linear, Conv1D, nn.LayerNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm-like: torch's LayerNorm/RMSNorm, or a model's own norm class (LlamaRMSNorm, T5LayerNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__.lower()
    weight = getattr(module, "weight", None)
    return name.endswith(("layernorm", "rmsnorm")) and isinstance(weight, torch.Tensor) and weight.dim() == 1


def is_bias_layer(module: nn.Module) -> bool:
    """Can BitFit give this layer a bias delta? Linear, transformers' Conv1D (GPT-2) and LayerNorm-like norms."""
    return isinstance(module, (nn.Linear, Conv1D)) or is_norm_layer(module)


def bias_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of the layer's (possibly missing) bias, i.e. of its output's trailing dimensions."""
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    if isinstance(module, Conv1D):
        return (module.nf,)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(module.normalized_shape)
    return tuple(module.weight.shape)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def can_merge(module: nn.Module) -> bool:
    """Whether a delta can be folded into the layer itself: it has a bias, or its forward would use one if set."""
    return has_bias(module) or isinstance(module, _CAN_HOLD_BIAS)


class BitFitLayer(nn.Module, BaseTunerLayer):
    """Wraps a Linear / Conv1D / norm layer; holds one bias delta per adapter in `bitfit_bias`."""

    adapter_layer_names = ("bitfit_bias",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bitfit_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.bias_shape = bias_shape(base_layer)
        # exact types only: a subclass (e.g. a quantized Linear) may compute something else, so it runs its own forward
        self._fusable = type(base_layer) in _CAN_HOLD_BIAS
        # the base layer's bias before the first merge (None: it had none): unmerge restores it bit for bit
        self._bias_before_merge: torch.Tensor | None = None
        self.update_layer(adapter_name, **kwargs)

    def update_layer(self, adapter_name: str, inference_mode: bool = False, **kwargs: Any) -> None:
        """Add a zero delta for `adapter_name`: the layer's output is unchanged until it is trained."""
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(self.bias_shape))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """bias += delta for each adapter; a layer without a bias gets one (if its type uses a bias at all)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.bitfit_bias:
                continue
            if not can_merge(base):
                raise ValueError(
                    f"cannot merge BitFit adapter {name!r} into a {type(base).__name__}: this layer type has no bias "
                    "to add it to; keep the adapter unmerged, or leave such layers out (add_missing_biases=False)"
                )
            delta = self.bitfit_bias[name].detach()
            if not self.merged_adapters:
                self._bias_before_merge = base.bias.detach().clone() if has_bias(base) else None
            if not has_bias(base):
                like = base.weight if isinstance(getattr(base, "weight", None), torch.Tensor) else delta
                base.bias = nn.Parameter(
                    torch.zeros_like(delta, dtype=like.dtype, device=like.device), requires_grad=False
                )
            merged = base.bias.data + delta.to(base.bias.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged bias: BitFit adapter {name!r} seems to be broken")
            base.bias.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the bias from before the merge exactly (subtracting the deltas again would round)."""
        if not self.merged_adapters:
            return
        base = self.get_base_layer()
        if self._bias_before_merge is None:
            base.bias = None
        else:
            base.bias.data = self._bias_before_merge
        self._bias_before_merge = None
        self.merged_adapters.clear()

    def _active_delta(self) -> torch.Tensor | None:
        deltas = [self.bitfit_bias[name] for name in self.active_adapters if name in self.bitfit_bias]
        if not deltas:
            return None
        return deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)

    def _fused_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's own computation with `bias + delta` as its bias: one kernel, no extra activation pass."""
        base = self.base_layer
        dtype = x.dtype if base.weight is None else base.weight.dtype
        bias = delta.to(dtype) if base.bias is None else base.bias + delta.to(base.bias.dtype)
        if isinstance(base, nn.Linear):
            return F.linear(x, base.weight, bias)
        if isinstance(base, Conv1D):  # transformers' Conv1D.forward, with the new bias
            return torch.addmm(bias, x.view(-1, x.size(-1)), base.weight).view(*x.shape[:-1], base.nf)
        return F.layer_norm(x, base.normalized_shape, base.weight, bias, base.eps)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        delta = None if self.merged else self._active_delta()
        if delta is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        # hooks, or a forward replaced on the instance (accelerate's offloading hooks do that), must run
        hooked = base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base)
        if self._fusable and not args and not kwargs and not hooked:
            return self._fused_forward(x, delta)
        result = base(x, *args, **kwargs)
        return result + delta.to(result.dtype)

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()

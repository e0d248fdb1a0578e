"""UniPELT tuner layers: gated LoRA on query/value, gated bottleneck adapter after the feed-forward block, and the
gated prefix that rides on an attention module as a small child module (`gated_prefix`).

The attention module itself is not replaced: it contains the LoRA targets (query/value), and replacing a module that
contains other targets breaks PEFT's injection pass. The prefix keys/values enter attention through the wrapped
"eager"/"sdpa" attention functions in `attention.py`, which look for that child.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peftlab.methods.unipelt.config import UniPELTConfig
from peftlab.methods.unipelt.gates import Gate

PREFIX_CHILD = "gated_prefix"
MERGE_REFUSED = (
    "UniPELT cannot be merged into the base weights: its gates depend on the input (G = mean_t sigmoid(W x_t + b)), "
    "so the gated LoRA update is not a fixed weight delta, and the prefix and adapter are not weight deltas at all. "
    "Keep the PeftModel for inference, or use `unload()` to get the base model back without the adapter."
)
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (GPT-2), else ValueError."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise ValueError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


class UniPELTLayer(BaseTunerLayer):
    """Common behaviour: refuse merging (the gates depend on the input)."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        raise ValueError(MERGE_REFUSED)

    def _adapter_numel(self, adapter_name: str) -> int:
        total = 0
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                entry = container[adapter_name]
                total += (
                    entry.numel() if isinstance(entry, nn.Parameter) else sum(p.numel() for p in entry.parameters())
                )
        return total


class UniPELTLoraLinear(nn.Module, UniPELTLayer):
    """y = W x + G(x) * B A x; the gate replaces LoRA's alpha/r scale.

    A plain query or value projection gets one LoRA pair and gate over its whole output. A fused [q; k; v] projection
    (GPT-2 c_attn) gets two, on the query third (`unipelt_lora_A/B/gate`) and on the value third (`..._v`): the
    paper's separate Q and V gates.
    """

    adapter_layer_names = (
        "unipelt_lora_A",
        "unipelt_lora_B",
        "unipelt_lora_gate",
        "unipelt_lora_A_v",
        "unipelt_lora_B_v",
        "unipelt_lora_gate_v",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: UniPELTConfig, fused_qkv: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.fused_qkv = fused_qkv
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ModuleDict())
        self.lora_dropout: dict[str, float] = {}
        self.lora_scale: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _parts(self) -> list[tuple[str, int, int]]:
        """(attribute suffix, start, end) of the output slices that get a LoRA pair."""
        if not self.fused_qkv:
            return [("", 0, self.out_features)]
        third = self.out_features // 3
        return [("", 0, third), ("_v", 2 * third, 3 * third)]

    def update_layer(self, adapter_name: str, config: UniPELTConfig) -> None:
        for suffix, start, end in self._parts():
            down = nn.Linear(self.in_features, config.lora_r, bias=False)
            up = nn.Linear(config.lora_r, end - start, bias=False)
            nn.init.kaiming_uniform_(down.weight, a=5**0.5)
            nn.init.zeros_(up.weight)
            getattr(self, "unipelt_lora_A" + suffix)[adapter_name] = down
            getattr(self, "unipelt_lora_B" + suffix)[adapter_name] = up
            if config.use_gates:
                getattr(self, "unipelt_lora_gate" + suffix)[adapter_name] = Gate(
                    self.in_features, config.gate_ignores_padding
                )
        self.lora_dropout[adapter_name] = float(config.lora_dropout)
        self.lora_scale[adapter_name] = config.lora_alpha / config.lora_r
        self.to(self.base_layer.weight.device)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.unipelt_lora_A:
                continue
            p = self.lora_dropout[name]
            lora_in = F.dropout(x, p=p, training=self.training) if p > 0 else x
            lora_in = lora_in.to(self.unipelt_lora_A[name].weight.dtype)
            deltas = []
            for suffix, _, _ in self._parts():
                delta = getattr(self, "unipelt_lora_B" + suffix)[name](
                    getattr(self, "unipelt_lora_A" + suffix)[name](lora_in)
                )
                gates = getattr(self, "unipelt_lora_gate" + suffix)
                delta = delta * gates[name](x.to(delta.dtype)) if name in gates else delta * self.lora_scale[name]
                deltas.append(delta.to(result.dtype))
            if not self.fused_qkv:
                result = result + deltas[0]
            else:
                third = self.out_features // 3
                result = torch.cat(
                    (
                        result[..., :third] + deltas[0],
                        result[..., third : 2 * third],
                        result[..., 2 * third :] + deltas[1],
                    ),
                    dim=-1,
                )
        return result


class UniPELTAdapterLinear(nn.Module, UniPELTLayer):
    """Wraps the last linear of a feed-forward block: y = W x; y' = y + G_A(y) * up(act(down(y))).

    This is the sequential (Pfeiffer) placement: one adapter per layer, after the feed-forward block, before that
    block's residual connection (and, in BERT, its LayerNorm). `up` starts at zero, so the adapter starts as identity.
    """

    adapter_layer_names = ("unipelt_adapter_down", "unipelt_adapter_up", "unipelt_adapter_gate")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: UniPELTConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.unipelt_adapter_down = nn.ModuleDict()
        self.unipelt_adapter_up = nn.ModuleDict()
        self.unipelt_adapter_gate = nn.ModuleDict()
        self.activation = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: UniPELTConfig) -> None:
        hidden = self.out_features
        bottleneck = max(1, hidden // config.adapter_reduction_factor)
        up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.unipelt_adapter_down[adapter_name] = nn.Linear(hidden, bottleneck)
        self.unipelt_adapter_up[adapter_name] = up
        if config.use_gates:
            self.unipelt_adapter_gate[adapter_name] = Gate(hidden, config.gate_ignores_padding)
        self.activation[adapter_name] = _ACTIVATIONS[config.adapter_nonlinearity]()
        self.to(self.base_layer.weight.device)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.unipelt_adapter_down:
                continue
            down = self.unipelt_adapter_down[name]
            h = result.to(down.weight.dtype)
            out = self.unipelt_adapter_up[name](self.activation[name](down(h)))
            if name in self.unipelt_adapter_gate:
                out = out * self.unipelt_adapter_gate[name](h)
            result = result + out.to(result.dtype)
        return result


class PrefixEncoder(nn.Module):
    """The paper's reparameterization, shared by all layers: Embedding(L, d) -> Linear(d, h) -> Tanh -> Linear(h, 2nkv).

    The MLP runs once per forward of each transformer stack (`refresh`, called from the stack's pre-hook, outside any
    gradient-checkpointed layer), and each prefixed attention module takes its columns of that output.
    """

    def __init__(self, length: int, hidden_size: int, mlp_size: int, kv_dims: list[int]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(length, hidden_size)
        self.down = nn.Linear(hidden_size, mlp_size)
        self.up = nn.Linear(mlp_size, 2 * sum(kv_dims))
        offsets = [0]
        for kv_dim in kv_dims:
            offsets.append(offsets[-1] + 2 * kv_dim)
        self.offsets = offsets
        self.current: torch.Tensor | None = None

    def refresh(self) -> torch.Tensor:
        """(L, n_modules * 2 * kv_dim): every module's keys and values from the current MLP weights."""
        self.current = self.up(torch.tanh(self.down(self.embedding.weight)))
        return self.current

    def key_values(self, index: int, fresh: bool = False) -> torch.Tensor:
        """(2, L, kv_dim) of the `index`-th prefixed module; `fresh` recomputes (e.g. after an optimizer step)."""
        full = self.refresh() if fresh or self.current is None else self.current
        out = full[:, self.offsets[index] : self.offsets[index + 1]]
        return out.reshape(out.shape[0], 2, -1).transpose(0, 1)


class UniPELTPrefix(nn.Module, UniPELTLayer):
    """Prefix keys/values of one attention module, and the gate G_P computed from that module's input.

    While training, the keys/values come from the shared `PrefixEncoder` (kept on the tuner model); the saved adapter
    and a loaded one hold them folded (`unipelt_prefix_kv`, shape (2, L, kv_heads * head_dim)), so inference needs no
    MLP. The gate enters attention as log(G_P) added to the prefix positions' scores: the prefix tokens' share of the
    attention mass is scaled by G_P, so G_P = 1 is plain prefix tuning and G_P = 0 removes the prefix exactly.
    """

    adapter_layer_names = ("unipelt_prefix_kv", "unipelt_prefix_gate")

    def __init__(
        self, hidden_size: int, num_kv_heads: int, head_dim: int, adapter_name: str, config: UniPELTConfig
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.unipelt_prefix_kv = nn.ParameterDict()
        self.unipelt_prefix_gate = nn.ModuleDict()
        self.encoders: dict[str, tuple[PrefixEncoder, int]] = {}
        self.attention_input: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def update_layer(self, adapter_name: str, config: UniPELTConfig) -> None:
        self.unipelt_prefix_kv[adapter_name] = nn.Parameter(torch.zeros(2, config.prefix_length, self.kv_dim))
        if config.use_gates:
            self.unipelt_prefix_gate[adapter_name] = Gate(self.hidden_size, config.gate_ignores_padding)
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """As BaseTunerLayer, but the folded keys/values stay frozen while the shared MLP produces them."""
        super().set_adapter(adapter_names, inference_mode)
        for name, param in self.unipelt_prefix_kv.items():
            if name in self.encoders:
                param.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.encoders.pop(adapter_name, None)

    def key_values(self, adapter_name: str, fresh: bool = False) -> torch.Tensor:
        """(2, L, kv_dim), from the shared MLP while training, else the folded parameter."""
        if adapter_name in self.encoders:
            encoder, index = self.encoders[adapter_name]
            return encoder.key_values(index, fresh=fresh)
        return self.unipelt_prefix_kv[adapter_name]

    def active_prefix(self) -> str | None:
        """The adapter whose prefix applies now (None: disabled, or no active adapter has a prefix here)."""
        if self.disable_adapters:
            return None
        names = [n for n in self.active_adapters if n in self.unipelt_prefix_kv]
        if len(names) > 1:
            raise ValueError(f"UniPELT applies one prefix at a time; active adapters with a prefix: {names}")
        return names[0] if names else None

    def log_gate(self, adapter_name: str, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """log G_P as (batch, 1, 1 or seq, 1), to add to the prefix positions' attention scores; None without gates."""
        if adapter_name not in self.unipelt_prefix_gate:
            return None
        gate = self.unipelt_prefix_gate[adapter_name]
        g = gate(hidden.to(gate.weight.dtype)).to(dtype)
        return torch.log(g).clamp_min(torch.finfo(dtype).min)[:, None]

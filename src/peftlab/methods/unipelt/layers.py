"""UniPELT tuner layers: gated LoRA on query/value, the gated bottleneck adapter after the feed-forward block, and the
gated prefix. Adapter and prefix ride on their target as small child modules (`gated_adapter`, `gated_prefix`).

Those targets are not replaced: an attention module contains the LoRA targets (query/value), a pre-LN transformer layer
contains all of them, and replacing a module that contains other targets breaks PEFT's injection pass. The prefix
keys/values enter attention through the wrapped "eager"/"sdpa" attention functions in `attention.py`, which look for
the `gated_prefix` child; the adapter is applied by a forward hook on its target (`adapter_hook`).

Initialization follows the official code (BERT's `_init_weights`, AdapterHub's `init_bert_weights`): N(0, 0.02)
weights and zero biases for the gates, the prefix embedding and MLP, and both adapter projections; LoRA A is
Kaiming-uniform and LoRA B zero, as in the official `lora_layers.py`.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peftlab.methods.unipelt.config import UniPELTConfig
from peftlab.methods.unipelt.gates import Gate, init_official

PREFIX_CHILD = "gated_prefix"
ADAPTER_CHILD = "gated_adapter"
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


class UniPELTAdapter(nn.Module, UniPELTLayer):
    """Gated bottleneck adapter, riding on its target module as the child `gated_adapter` (applied by
    `adapter_hook`): the target is not replaced, because in pre-LN models it is a whole transformer layer that also
    contains the LoRA and prefix targets.

    Two forms, chosen by the target (see `UniPELTConfig.adapter_placement`):
    - `post_norm` (the target is a post-LN model's feed-forward LayerNorm, BERT): with z = h + x its input,
      out = LN(z + G_A * A(LN(z))), the gate and adapter reading LN(z): the official code's Pfeiffer placement;
    - otherwise, with z the target's output: out = z + G_A * A(z). For the output of a pre-LN layer (GPT-2, LLaMA, T5's
      feed-forward sub-layer) that is the official placement (the adapter reads h + x); for the feed-forward block's
      last linear it is the older `ffn_output` placement (the adapter reads the raw feed-forward output).
    """

    adapter_layer_names = ("unipelt_adapter_down", "unipelt_adapter_up", "unipelt_adapter_gate")

    def __init__(self, hidden_size: int, post_norm: bool, adapter_name: str, config: UniPELTConfig) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.post_norm = post_norm
        self.unipelt_adapter_down = nn.ModuleDict()
        self.unipelt_adapter_up = nn.ModuleDict()
        self.unipelt_adapter_gate = nn.ModuleDict()
        self.activation = nn.ModuleDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: UniPELTConfig) -> None:
        bottleneck = max(1, self.hidden_size // config.adapter_reduction_factor)
        self.unipelt_adapter_down[adapter_name] = init_official(nn.Linear(self.hidden_size, bottleneck))
        self.unipelt_adapter_up[adapter_name] = init_official(nn.Linear(bottleneck, self.hidden_size))
        if config.use_gates:
            self.unipelt_adapter_gate[adapter_name] = Gate(self.hidden_size, config.gate_ignores_padding)
        self.activation[adapter_name] = _ACTIVATIONS[config.adapter_nonlinearity]()
        self.set_adapter(self.active_adapters)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """Sum over the active adapters of G_A(x) * up(act(down(x))), or None when none applies here."""
        if self.disable_adapters:
            return None
        total = None
        for name in self.active_adapters:
            if name not in self.unipelt_adapter_down:
                continue
            down = self.unipelt_adapter_down[name]
            h = x.to(down.weight.dtype)
            out = self.unipelt_adapter_up[name](self.activation[name](down(h)))
            if name in self.unipelt_adapter_gate:
                out = out * self.unipelt_adapter_gate[name](h)
            total = out if total is None else total + out
        return None if total is None else total.to(x.dtype)


def adapter_hook(module: nn.Module, args: tuple, output: object) -> object:
    """Forward hook of an adapter target: apply its `gated_adapter` child to the output (see `UniPELTAdapter`)."""
    adapter: UniPELTAdapter = getattr(module, ADAPTER_CHILD)
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if hidden.shape[-1] != adapter.hidden_size:
        raise ValueError(
            f"adapter_target_modules: {type(module).__name__} returns features of size {hidden.shape[-1]}, not the "
            f"hidden size {adapter.hidden_size}; target a feed-forward block's output (or its LayerNorm)"
        )
    delta = adapter.delta(hidden)
    if delta is None:
        return None
    # post-LN: the same LayerNorm again (its forward, not its hooks), on its input plus the adapter's update
    hidden = module.forward(args[0] + delta) if adapter.post_norm else hidden + delta
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


class PrefixEncoder(nn.Module):
    """The paper's reparameterization, shared by all layers: Embedding(L, d) -> Linear(d, h) -> Tanh -> Linear(h, 2nkv).

    The last Linear is kept as one Linear(h, 2 kv) per prefixed module (the same function as one Linear split by
    output rows), so that each attention module computes its own keys/values from the parameters inside its own
    forward: autograd and gradient checkpointing (reentrant or not, which rerun a layer's forward during backward)
    then see an ordinary computation per layer, never a tensor shared across layers or across steps. The shared
    first Linear is recomputed per module (L x d x h multiply-adds, small next to a layer). Without autograd
    (evaluation, generation) the results are cached until a parameter changes.
    """

    def __init__(self, length: int, hidden_size: int, mlp_size: int, kv_dims: list[int]) -> None:
        super().__init__()
        self.embedding = init_official(nn.Embedding(length, hidden_size))
        self.down = init_official(nn.Linear(hidden_size, mlp_size))
        self.up = nn.ModuleList(init_official(nn.Linear(mlp_size, 2 * kv_dim)) for kv_dim in kv_dims)
        self._cache: tuple[tuple, dict[int, torch.Tensor]] = ((), {})

    def _compute(self, index: int) -> torch.Tensor:
        # the embedding through its forward (not `.weight`): wrappers that gather parameters on a module call
        # (DeepSpeed ZeRO-3) then see it
        positions = torch.arange(self.embedding.num_embeddings, device=self.down.bias.device)
        out = self.up[index](torch.tanh(self.down(self.embedding(positions))))  # (L, 2 kv)
        return out.reshape(out.shape[0], 2, -1).transpose(0, 1)

    def key_values(self, index: int) -> torch.Tensor:
        """(2, L, kv_dim) of the `index`-th prefixed module, from the current parameters."""
        if torch.is_grad_enabled():
            return self._compute(index)
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if self._cache[0] != stamp:
            self._cache = (stamp, {})
        values = self._cache[1]
        if index not in values:
            values[index] = self._compute(index)
        return values[index]


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

    def key_values(self, adapter_name: str) -> torch.Tensor:
        """(2, L, kv_dim), from the shared MLP while training, else the folded parameter."""
        if adapter_name in self.encoders:
            encoder, index = self.encoders[adapter_name]
            return encoder.key_values(index)
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

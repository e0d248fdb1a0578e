"""UniPELTConfig: gated LoRA + prefix tuning + bottleneck adapter (Mao et al., ACL 2022)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from peftlab.integration import PeftlabConfigMixin

COMPONENTS = ("lora", "prefix", "adapter")
NONLINEARITIES = ("relu", "gelu", "tanh", "silu")

ADAPTER_PLACEMENTS = ("official", "ffn_output")

# Per architecture (transformers `model_type`): LoRA targets (query and value projections), attention modules that
# receive the prefix, and, per adapter placement, the modules whose output (or, for a LayerNorm, whose input) the
# adapter transforms. A list entry matches a module whose name equals it or ends with "." + it; a string is a regular
# expression that must match the whole module name. GPT-2 has one fused c_attn projection: LoRA goes on its query and
# value thirds.
# Adapter placement "official" (morningmoni/UniPELT, AdapterHub SeqBnConfig): with h the feed-forward output (after its
# dropout) and x its residual input, the adapter reads h + x: in post-LN BERT/RoBERTa it wraps the feed-forward
# LayerNorm, out = LN(h + x + G * A(LN(h + x))); in pre-LN GPT-2, LLaMA and T5 it sits on the output of the layer's
# feed-forward residual (the decoder layer, T5's feed-forward sub-layer), out = h + x + G * A(h + x).
# "ffn_output" (peftlab's earlier placement): the adapter reads the raw output of the feed-forward block's last linear.
# T5: LoRA on the q/v of self- and cross-attention (as PEFT's LoRA default), the prefix on the self-attention of
# encoder and decoder (add "EncDecAttention" to prefix_target_modules to prefix cross-attention too), the adapter
# after every feed-forward block of encoder and decoder.
_BERT_LIKE = {
    "lora": ["query", "value"],
    "prefix": ["attention.self"],
    "adapter": {"official": r".*\.layer\.\d+\.output\.LayerNorm", "ffn_output": r".*\.layer\.\d+\.output\.dense"},
    "fused_qkv": False,
}
DEFAULT_TARGETS: dict[str, dict] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "gpt2": {
        "lora": ["attn.c_attn"],
        "prefix": ["attn"],
        "adapter": {"official": r"(.*\.)?h\.\d+", "ffn_output": ["mlp.c_proj"]},
        "fused_qkv": True,
    },
    "llama": {
        "lora": ["q_proj", "v_proj"],
        "prefix": ["self_attn"],
        "adapter": {"official": r"(.*\.)?layers\.\d+", "ffn_output": ["mlp.down_proj"]},
        "fused_qkv": False,
    },
    "t5": {
        "lora": ["q", "v"],
        "prefix": ["SelfAttention"],
        # the feed-forward sub-layer (T5LayerFF) is layer 1 of an encoder block, layer 2 of a decoder block
        "adapter": {
            "official": r"(.*\.)?(encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)",
            "ffn_output": ["DenseReluDense.wo"],
        },
        "fused_qkv": False,
    },
}


@dataclass
class UniPELTConfig(PeftConfig, PeftlabConfigMixin):
    """UniPELT: each submodule of each layer is scaled by its own learned gate (Linear(d, 1) + sigmoid per token).

    Defaults are the paper's UniPELT-APL; `components=("adapter", "prefix")` is UniPELT-AP.

    Args:
        components: which submodules to add: any non-empty subset of "lora", "prefix", "adapter".
        adapter_placement: "official" (default): the adapter reads h + x, the feed-forward output plus its residual,
            as the official code (post-LN BERT: out = LN(h + x + G * A(LN(h + x))); pre-LN GPT-2/LLaMA/T5:
            out = h + x + G * A(h + x)); "ffn_output": peftlab's earlier placement, the adapter reads the raw output of
            the feed-forward block's last linear (out = LN(h + G * A(h) + x) in BERT). Selects the default
            adapter_target_modules; explicit targets get the LayerNorm form if they are LayerNorms, else z + G * A(z)
            on their output z.
        use_gates: False gives the paper's "no gates" ablation (every gate is 1; LoRA then uses lora_alpha / lora_r).
        gate_ignores_padding: the gate averages over real tokens only (padded and unpadded inputs then give the same
            outputs); False averages over padding too, like the official code and AdapterHub `adapters`.
        lora_r: LoRA rank. lora_alpha: LoRA scale numerator, used only without gates (the gate replaces alpha/r).
        lora_dropout: dropout on the LoRA input.
        prefix_length: number of prefix key/value positions per attention module.
        prefix_hidden_size: hidden size of the reparameterization MLP shared by all layers
            (Embedding(L, d) -> Linear(d, h) -> Tanh -> Linear(h, n_modules * 2 * kv_dim)).
        adapter_reduction_factor: adapter bottleneck = hidden size // this factor (16: 48 for BERT-base).
        adapter_nonlinearity: "relu" (paper), "gelu", "tanh" or "silu".
        lora_target_modules / prefix_target_modules / adapter_target_modules: module-name patterns per component
            (list: exact name or "." suffix; str: regex matching the whole name); None takes the architecture
            default (BERT/RoBERTa, GPT-2, LLaMA, T5; for the adapter, per adapter_placement).
        lora_fused_qkv: the LoRA targets are fused [query; key; value] projections (GPT-2's c_attn): LoRA goes on
            the query and value thirds only, with a gate each. None takes the architecture default.
        target_modules: not used for matching (the three lists above are); kept for PEFT's bookkeeping.
        modules_to_save: modules trained and saved in full (PEFT adds the task head).
    """

    components: tuple[str, ...] = field(default=COMPONENTS, metadata={"help": "Subset of lora, prefix, adapter."})
    adapter_placement: str = field(default="official", metadata={"help": "official or ffn_output."})
    use_gates: bool = field(default=True, metadata={"help": "False: the paper's no-gate ablation."})
    gate_ignores_padding: bool = field(default=True, metadata={"help": "Gate mean over real tokens only."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator, only used without gates."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    prefix_length: int = field(default=10, metadata={"help": "Prefix positions per attention module."})
    prefix_hidden_size: int = field(default=512, metadata={"help": "Hidden size of the prefix MLP."})
    adapter_reduction_factor: int = field(default=16, metadata={"help": "Bottleneck = hidden // this."})
    adapter_nonlinearity: str = field(default="relu", metadata={"help": "relu, gelu, tanh or silu."})
    lora_target_modules: list[str] | str | None = field(default=None, metadata={"help": "LoRA targets."})
    prefix_target_modules: list[str] | str | None = field(default=None, metadata={"help": "Prefixed attention."})
    adapter_target_modules: list[str] | str | None = field(default=None, metadata={"help": "Adapter targets."})
    lora_fused_qkv: bool | None = field(default=None, metadata={"help": "LoRA targets are fused q/k/v."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Unused for matching."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never adapted."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType("UNIPELT")
        components = (self.components,) if isinstance(self.components, str) else self.components
        if not isinstance(components, (list, tuple, set)) or not components:
            raise ValueError(f"components must be a non-empty subset of {COMPONENTS}; got {self.components!r}")
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"components: unknown name(s) {unknown}; allowed: {COMPONENTS}")
        self.components = tuple(c for c in COMPONENTS if c in components)
        if self.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ValueError(f"adapter_placement must be one of {ADAPTER_PLACEMENTS}; got {self.adapter_placement!r}")
        for name in ("use_gates", "gate_ignores_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("lora_r", "prefix_length", "prefix_hidden_size", "adapter_reduction_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number; got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        if self.adapter_nonlinearity not in NONLINEARITIES:
            raise ValueError(f"adapter_nonlinearity must be one of {NONLINEARITIES}; got {self.adapter_nonlinearity!r}")
        if self.lora_fused_qkv is not None and not isinstance(self.lora_fused_qkv, bool):
            raise ValueError(f"lora_fused_qkv must be True, False or None; got {self.lora_fused_qkv!r}")
        for name in ("lora_target_modules", "prefix_target_modules", "adapter_target_modules"):
            setattr(self, name, _checked_patterns(name, getattr(self, name)))


def _checked_patterns(name: str, value: object) -> list[str] | str | None:
    allowed = "None (architecture default), a regex string, or a non-empty list of module names"
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"{name}: {value!r} is not a valid regular expression ({error})") from None
        return value
    if not isinstance(value, (list, tuple, set)) or not value or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return sorted(value)


def matches(patterns: list[str] | str, key: str) -> bool:
    """PEFT's target_modules semantics: a regex string must match the whole name; list entries match a suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith("." + p) for p in patterns)

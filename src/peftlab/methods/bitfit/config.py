"""BitFitConfig: which bias terms to train (Ben Zaken et al., ACL 2022)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from peftlab.integration import PeftlabConfigMixin

BIAS_TERM_CHOICES = ("all", "paper")


@dataclass
class BitFitConfig(PeftConfig, PeftlabConfigMixin):
    """Train bias terms only (plus the task head, which PEFT adds to `modules_to_save` per task type).

    Args:
        bias_terms: "all" (every Linear / Conv1D bias and every LayerNorm-like norm bias of the model body that the
            model can express; the task head and the LM head are not given one), "paper" (the paper's subset:
            attention query and first feed-forward layer biases, mapped per architecture, plus the pooler's dense
            bias where there is one, as in the official code), or a list of module-name patterns, each matching a
            module whose name equals it, ends with "." + it, or fully matches it as a regular expression.
            A norm that cannot hold a bias (RMSNorm, T5's norm) is in "all" only where its bias folds exactly into
            the plain Linear layers that alone consume its output (LLaMA, Mistral, Qwen2/3: input_layernorm ->
            q/k/v_proj, post_attention_layernorm -> gate/up_proj), which is how `export_adapter` writes it; others
            (the final norm, whose output is the hidden state read by a bias-less head; Qwen3's q_norm/k_norm; T5's
            norms) are left out, and can still be selected by pattern (`export_adapter` then refuses them).
        add_missing_biases: give layers that have no bias (T5, LLaMA, bias-free LayerNorms) a zero-initialised
            trainable bias; False leaves them alone.
        target_modules: filled in by BitFit from `bias_terms` when the model is wrapped, and saved with the adapter,
            so that a reload targets exactly the same layers. When set by hand it selects the layers directly, as in
            other PEFT methods, and `bias_terms` is not consulted.
        exclude_modules: module names (list: exact or suffix; str: regex) never to give a bias.
        modules_to_save: modules trained and saved in full besides the biases (the task head is added by PEFT).
    """

    bias_terms: str | list[str] = field(
        default="all",
        metadata={"help": "'all', 'paper', or a list of module-name patterns (exact, suffix or regex)."},
    )
    add_missing_biases: bool = field(
        default=True,
        metadata={"help": "Give bias-less layers a zero-initialised trainable bias (False: leave them alone)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Set from bias_terms when the model is wrapped; if given, it selects the layers directly."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules never to give a bias (list: exact or suffix match; str: regex)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained and saved in full besides the biases (PEFT adds the task head)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType("BITFIT")
        self.bias_terms = _checked_bias_terms(self.bias_terms)
        if not isinstance(self.add_missing_biases, bool):
            raise ValueError(f"add_missing_biases must be True or False, got {self.add_missing_biases!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)


def _checked_bias_terms(value: object) -> str | list[str]:
    allowed = "'all', 'paper', or a non-empty list of module-name patterns (exact name, suffix or regex)"
    if isinstance(value, (list, tuple)) and len(value) == 1 and value[0] in BIAS_TERM_CHOICES:
        value = value[0]  # a command line (e.g. `peftlab train --bias_terms paper`) passes a one-item list
    if isinstance(value, str):
        if value not in BIAS_TERM_CHOICES:
            raise ValueError(f"bias_terms must be {allowed}; got {value!r}")
        return value
    if not isinstance(value, (list, tuple, set)) or not value or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"bias_terms must be {allowed}; got {value!r}")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"bias_terms pattern {pattern!r} is not a valid regular expression: {error}") from None
    return list(value)

"""The conformance matrix's table (in the shape of PEFT's `TEST_CASES`): rows, checks, refusals and known failures.

A row is one method on one model family and task type; a check (column) is one test function of
test_conformance.py, written once and run on every row it applies to. A new method adds rows here, not a test file.
A cell that fails today is listed in KNOWN_FAILURES with its cause: it runs as a strict xfail, so the fix that makes
it pass turns it into a failure until its entry is removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from peft import LoraConfig, PeftConfig
from tiny import GENERATIVE

from peftlab import BitFitConfig, ResidualPromptTuningConfig, UniPELTConfig, XPromptConfig

ENCODERS = ("bert", "roberta")
DECODERS = ("gpt2", "llama", "qwen2")
ENCODER_DECODERS = ("t5", "bart")
MAIN_TASK = {
    **dict.fromkeys(ENCODERS, "SEQ_CLS"),
    **dict.fromkeys(DECODERS, "CAUSAL_LM"),
    **dict.fromkeys(ENCODER_DECODERS, "SEQ_2_SEQ_LM"),
}
# the other task types, on BERT only, for the cheap checks
BERT_EXTRA_TASKS = ("TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# UniPELT has default targets for bert/roberta/gpt2/llama/t5; on other architectures they are passed (and the
# defaults' refusal is asserted in REFUSALS)
UNIPELT_TARGETS = {
    "qwen2": {
        "lora_target_modules": ["q_proj", "v_proj"],
        "prefix_target_modules": ["self_attn"],
        "adapter_target_modules": ["mlp.down_proj"],
    },
    "bart": {
        "lora_target_modules": ["q_proj", "v_proj"],
        "prefix_target_modules": ["self_attn"],
        "adapter_target_modules": ["fc2"],
    },
}


def _unipelt(task_type: str, family: str, **kwargs) -> UniPELTConfig:
    # the paper's reduction 16 leaves 32 // 16 = 2 ReLU units on a tiny model, both often dead on a tiny batch (their
    # up-projection then never trains); 4 gives 8
    return UniPELTConfig(task_type=task_type, adapter_reduction_factor=4, **UNIPELT_TARGETS.get(family, {}), **kwargs)


# method -> config for (task type, family); defaults except the prompt length, which prompt tuning has no default for
METHODS: dict[str, Callable[[str, str], PeftConfig]] = {
    "bitfit": lambda task, family: BitFitConfig(task_type=task),
    "rpt": lambda task, family: ResidualPromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "unipelt": _unipelt,
    "unipelt_ap": lambda task, family: _unipelt(task, family, components=("adapter", "prefix")),
    "xprompt": lambda task, family: XPromptConfig(task_type=task, num_virtual_tokens=6),
    # stock PEFT control rows: a check that fails here is wrong itself, whatever peftlab does
    "lora": lambda task, family: LoraConfig(task_type=task, r=4),
}
EXPORTABLE = ("bitfit", "rpt", "xprompt")


@dataclass(frozen=True)
class Row:
    method: str
    family: str
    task_type: str
    pruned: bool = False  # XPrompt: tokens and pieces pruned (peftlab.xprompt.prune) before the checks

    @property
    def id(self) -> str:
        return "-".join([self.method + ("_pruned" if self.pruned else ""), self.family, self.task_type.lower()])

    def config(self) -> PeftConfig:
        return METHODS[self.method](self.task_type, self.family)

    @property
    def main(self) -> bool:
        """A row on its family's main task type (the expensive checks run on these only)."""
        return MAIN_TASK[self.family] == self.task_type


PEFTLAB_METHODS = ("bitfit", "rpt", "unipelt", "xprompt")
ROWS: list[Row] = [
    *(Row(method, family, task) for method in PEFTLAB_METHODS for family, task in MAIN_TASK.items()),
    *(Row(method, "bert", task) for method in PEFTLAB_METHODS for task in BERT_EXTRA_TASKS),
    Row("unipelt_ap", "llama", "CAUSAL_LM"),
    *(Row("xprompt", family, MAIN_TASK[family], pruned=True) for family in ("bert", "llama", "t5")),
    Row("lora", "bert", "SEQ_CLS"),
    Row("lora", "llama", "CAUSAL_LM"),
]

CHEAP_CHECKS = ("train", "reload", "disable", "cache", "adapters", "export", "answer_logits")
CHECKS = (*CHEAP_CHECKS, "checkpointing", "bf16", "kbit", "resume", "trl")


def applies(row: Row, check: str) -> bool:
    if check == "export":
        return row.method != "lora"  # UniPELT and BitFit on T5: the refusal is what is checked
    if check == "trl":
        return row.task_type == "CAUSAL_LM"
    if check == "cache":
        return row.task_type in GENERATIVE
    if check == "answer_logits":
        return row.task_type == "CAUSAL_LM"
    return check in CHEAP_CHECKS or row.main


# documented refusals of an export: (method, family or None for every family) -> the error message expected
EXPORT_REFUSALS: dict[tuple[str, str | None], str] = {
    ("unipelt", None): "export_adapter supports peft types",
    ("unipelt_ap", None): "export_adapter supports peft types",
    ("bitfit", "t5"): "cannot be exported as a stock",
    # Qwen2Config can give q/k/v a bias but not o_proj or the MLP, which the default selection trains
    ("bitfit", "qwen2"): "cannot be exported as a stock Qwen2ForCausalLM",
}
# BitFit's export folds norm biases into the linear biases they feed (W(y + b) = Wy + Wb): the same function with the
# float additions in another order, so its logits match to rounding, not bit for bit (generations must be identical)
EXPORT_ATOL = {"bitfit": 1e-6}


def export_refusal(row: Row) -> str | None:
    return EXPORT_REFUSALS.get((row.method, None)) or EXPORT_REFUSALS.get((row.method, row.family))


@dataclass(frozen=True)
class Refusal:
    """A configuration a method does not support: get_peft_model must refuse it with this message."""

    id: str
    family: str
    task_type: str
    config: Callable[[], PeftConfig]
    match: str


REFUSALS = [
    Refusal(
        f"unipelt-defaults-{family}",
        family,
        MAIN_TASK[family],
        lambda family=family: UniPELTConfig(task_type=MAIN_TASK[family]),
        f"lora_target_modules: no default for model type '{family}'",
    )
    for family in UNIPELT_TARGETS
] + [
    Refusal(
        "bitfit-paper-gpt2",
        "gpt2",
        "CAUSAL_LM",
        lambda: BitFitConfig(task_type="CAUSAL_LM", bias_terms="paper"),
        "fused c_attn layer that has a single bias",
    ),
]

# (row id, check) -> the one-line cause of today's failure. Entries leave this table when the fix is merged.
_UNIPELT = [row for row in ROWS if row.method.startswith("unipelt") and row.main]
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# The heaviest checks (a Trainer, a 4-bit load) run in the fast suite on these rows only, every peftlab method at
# least once; their other cells are left to `make test-slow`.
FAST_HEAVY: dict[str, set[str]] = {
    "kbit": {row.id for row in ROWS if row.family == "llama" and row.main},
    "trl": {row.id for row in ROWS if row.family == "llama"},
    "resume": {
        "bitfit-bert-seq_cls",
        "rpt-llama-causal_lm",
        "unipelt-gpt2-causal_lm",
        "xprompt-t5-seq_2_seq_lm",
        "xprompt_pruned-bert-seq_cls",
        "lora-llama-causal_lm",
    },
}
SLOW: set[tuple[str, str]] = {
    (row.id, check) for check, fast in FAST_HEAVY.items() for row in ROWS if applies(row, check) and row.id not in fast
}


def cells(check: str) -> list:
    """The rows the check applies to, as pytest params with their known-failure and speed marks."""
    params = []
    for row in ROWS:
        if not applies(row, check):
            continue
        marks = []
        if (row.id, check) in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(strict=True, reason=f"issue 8: {KNOWN_FAILURES[row.id, check]}"))
        if (row.id, check) in SLOW:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(row, id=row.id, marks=marks))
    return params

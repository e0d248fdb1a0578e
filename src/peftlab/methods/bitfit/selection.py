"""Which layers get a BitFit bias: `bias_terms` ("all", "paper" or name patterns) resolved against a model.

The result is an explicit list of module names, written into the config's `target_modules` (and so saved with the
adapter), which is what PEFT's BaseTuner then matches. Every check here runs before any layer is replaced.
"""

from __future__ import annotations

import re

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from peftlab.methods.bitfit.config import BitFitConfig
from peftlab.methods.bitfit.fold import fold_plan, use_counts
from peftlab.methods.bitfit.layer import can_merge, has_bias, is_bias_layer

_BERT_LIKE = (["attention.self.query"], ["intermediate.dense"])
_LLAMA_LIKE = (["self_attn.q_proj"], ["mlp.gate_proj", "mlp.up_proj"])  # gated FFN: both d -> d_ff projections
_T5_LIKE = (
    ["SelfAttention.q", "EncDecAttention.q"],  # self- and cross-attention queries
    ["DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1"],  # wi, or gated T5 v1.1's wi_0 and wi_1
)

# The paper's subset (Ben Zaken et al. 2022, sec. 4): attention query biases and the biases of the first
# feed-forward layer (d -> d_ff), as (query patterns, first-FFN patterns) per model_type; plus the pooler's dense
# layer wherever the model has one (`_POOLER`).
PAPER_SUBSET: dict[str, tuple[list[str], list[str]]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT_LIKE),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), _LLAMA_LIKE),
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5_LIKE),
}
_POOLER = "pooler.dense"
# Architectures where the subset cannot be selected, and why.
PAPER_SUBSET_IMPOSSIBLE = {
    "gpt2": (
        "GPT-2 computes query, key and value with one fused c_attn layer that has a single bias for all three, so the "
        "query bias cannot be trained alone; bias_terms=['c_attn', 'c_fc'] trains the query/key/value and first "
        "feed-forward biases"
    ),
}


def _matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def candidate_layers(model: nn.Module, config: BitFitConfig) -> dict[str, nn.Module]:
    """Every layer that could take a bias, by name (wrapped ones by their base layer), minus excluded modules.

    Skipped: the insides of tuner layers and of auxiliary wrappers (e.g. a task head in `modules_to_save`), and
    modules excluded by `exclude_modules` or `modules_to_save`.
    """
    layers: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            inside.append(name + ".")
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not is_bias_layer(base):
            continue
        if not _excluded(config, name):
            layers[name] = base
    return layers


# The task heads PEFT trains through `modules_to_save` (for TOKEN_CLS it adds them only after injecting the adapter).
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


def _excluded(config: BitFitConfig, name: str) -> bool:
    """PEFT's exclusion rules (`exclude_modules`: regex if str, else exact or suffix; `modules_to_save`), and the
    task head of the config's task type."""
    exclude = config.exclude_modules
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return True
    if exclude and not isinstance(exclude, str) and (name in exclude or any(name.endswith("." + e) for e in exclude)):
        return True
    task_type = getattr(config.task_type, "value", config.task_type)
    heads = [*(config.modules_to_save or ()), *_TASK_HEADS.get(task_type, ())]
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in heads)


def _output_embedding_names(model: nn.Module) -> set[str]:
    try:
        output_embeddings = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return set()
    if output_embeddings is None:
        return set()
    return {name for name, module in model.named_modules() if module is output_embeddings}


def _allowed_examples(layers: dict[str, nn.Module]) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return ", ".join(suffixes) if suffixes else "(none)"


def _select_by_patterns(layers: dict[str, nn.Module], patterns: list[str], field: str) -> list[str]:
    chosen: list[str] = []
    for pattern in patterns:
        hits = [name for name in layers if _matches(pattern, name)]
        if not hits:
            raise ValueError(
                f"{field} pattern {pattern!r} matches no Linear, Conv1D or LayerNorm-like layer of this model; "
                f"patterns match module names exactly, by suffix or as a full regex, e.g. one of: "
                f"{_allowed_examples(layers)}"
            )
        chosen += [name for name in hits if name not in chosen]
    return chosen


def _paper_subset(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PAPER_SUBSET_IMPOSSIBLE:
        raise ValueError(f"bias_terms='paper' is not available for {model_type}: {PAPER_SUBSET_IMPOSSIBLE[model_type]}")
    if model_type not in PAPER_SUBSET:
        raise ValueError(
            f"bias_terms='paper' has no layer map for model_type={model_type!r}; it is defined for "
            f"{', '.join(sorted(PAPER_SUBSET))}. Pass bias_terms as a list of module-name patterns instead."
        )
    chosen: list[str] = []
    for group, patterns in zip(("query", "first feed-forward"), PAPER_SUBSET[model_type], strict=True):
        hits = [name for name in layers if any(_matches(p, name) for p in patterns)]
        if not hits:
            raise ValueError(
                f"bias_terms='paper': no {group} layers ({', '.join(patterns)}) found in this {model_type} model"
            )
        chosen += hits
    # the official code (benzakenelad/BitFit, glue_evaluator.py) also trains the pooler's dense bias with any subset:
    # 46,848 biases on BERT-base, not 46,080; models without a pooler (RoBERTa's classifier, LLaMA, T5) have none
    return chosen + [name for name in layers if _matches(_POOLER, name)]


def resolve_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The names of the layers that get a bias delta for `config`; raises ValueError if there are none."""
    layers = candidate_layers(model, config)
    if config.target_modules is not None:
        # set by hand, or saved with the adapter: PEFT's own matching
        chosen = [name for name in layers if check_target_module_exists(config, name)]
        targets = config.target_modules
        field = f"target_modules={targets if isinstance(targets, str) else sorted(targets)!r}"
    elif config.bias_terms == "all":
        heads = _output_embedding_names(model)
        counts = use_counts(model)
        # a norm that cannot hold a bias is left out unless its bias folds into the linear layers it feeds
        chosen = [
            name
            for name, layer in layers.items()
            if name not in heads and (can_merge(layer) or fold_plan(model, name, counts)[1] is None)
        ]
        field = "bias_terms='all'"
    elif config.bias_terms == "paper":
        chosen = _paper_subset(model, layers)
        field = "bias_terms='paper'"
    else:
        chosen = _select_by_patterns(layers, config.bias_terms, "bias_terms")
        field = f"bias_terms={config.bias_terms!r}"
    if not config.add_missing_biases:
        chosen = [name for name in chosen if has_bias(layers[name])]
        field += " with add_missing_biases=False"
    if not chosen:
        raise ValueError(
            f"{field} selects no layer of this {type(model).__name__}: BitFit needs Linear, Conv1D or LayerNorm-like "
            f"layers (with a bias when add_missing_biases=False) outside the task head and exclude_modules"
        )
    order = {name: i for i, name in enumerate(layers)}
    return sorted(chosen, key=order.__getitem__)

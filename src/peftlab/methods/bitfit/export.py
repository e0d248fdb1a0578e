"""Export a BitFit adapter as a stock transformers model: the base model with the trained biases merged in.

Layers that had a bias keep their architecture. A bias inserted into a bias-less layer can only be expressed where
the model's config has a switch that gives those layers biases (LLaMA's `attention_bias` / `mlp_bias`); the switch
is turned on and the other layers it covers get zero biases, which leaves their outputs unchanged. A bias on a norm
that cannot hold one (RMSNorm) is folded into the linear layers that alone consume the norm's output (fold.py), which
then need biases in the same way. Anything else (T5's layers, the final RMSNorm) raises a ValueError naming the
layers, before any copy is made.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from peftlab.methods.bitfit.fold import add_to_bias, fold_plan, folded_contributions, use_counts
from peftlab.methods.bitfit.layer import BitFitLayer, can_merge, has_bias


def _parameter_shapes(model: PreTrainedModel, config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """The parameters a stock `type(model)` built from `config` has, without allocating them."""
    with torch.device("meta"):
        skeleton = type(model)(config)
    return {name: tuple(p.shape) for name, p in skeleton.named_parameters()}


def _with_flags(config: PretrainedConfig, flags: list[str]) -> PretrainedConfig:
    config = copy.deepcopy(config)
    for flag in flags:
        setattr(config, flag, True)
    return config


def _bias_flags(model: PreTrainedModel, needed: dict[str, tuple[int, ...]]) -> list[str]:
    """The config switches (False booleans named *bias*) that add exactly the biases in `needed`, and no other change.

    A switch is used if it adds at least one needed bias and leaves every existing parameter as it is.
    """
    reference = _parameter_shapes(model, model.config)
    flags = []
    for flag, value in model.config.to_dict().items():
        if value is not False or "bias" not in flag:
            continue
        shapes = _parameter_shapes(model, _with_flags(model.config, [flag]))
        added = shapes.keys() - reference.keys()
        unchanged = all(shapes.get(name) == shape for name, shape in reference.items())
        if unchanged and all(name.endswith(".bias") for name in added) and added & needed.keys():
            flags.append(flag)
    return flags


def _missing_bias_report(model: PreTrainedModel, missing: list[str]) -> str:
    described = [f"{name} ({type(model.get_submodule(name).get_base_layer()).__name__})" for name in missing]
    shown = ", ".join(described[:12]) + (f", ... ({len(described)} layers)" if len(described) > 12 else "")
    return shown


def _norm_folds(base: PreTrainedModel, adapter_name: str) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """norm name -> (its delta, the consumers it folds into) for each adapter delta on a norm that cannot hold a
    bias; raises a ValueError naming every such norm that does not fold, and why."""
    counts = use_counts(base)
    folds, refused = {}, []
    for name, module in base.named_modules():
        if not isinstance(module, BitFitLayer) or adapter_name not in module.bitfit_bias:
            continue
        if can_merge(module.get_base_layer()):
            continue
        consumers, reason = fold_plan(base, name, counts)
        if reason:
            refused.append(f"{name} ({type(module.get_base_layer()).__name__}): {reason}")
        else:
            folds[name] = (module.bitfit_bias[adapter_name], consumers)
    if refused:
        raise ValueError(
            f"BitFit adapter {adapter_name!r} cannot be exported as a stock {type(base).__name__}: these norms got a "
            f"bias that neither they nor the linear layers they feed can hold: {'; '.join(refused)}. Keep it as a "
            "peftlab adapter (save_pretrained), or train without those norms (exclude_modules or bias_terms)."
        )
    return folds


def export_bitfit(model: PeftModel, adapter_name: str, folder: Path) -> None:
    """Write the base model with `adapter_name`'s biases merged (and its task head) with `save_pretrained`."""
    base = model.get_base_model()
    folds = _norm_folds(base, adapter_name)
    needed = {
        f"{name}.bias": module.bias_shape
        for name, module in base.named_modules()
        if isinstance(module, BitFitLayer)
        and adapter_name in module.bitfit_bias
        and name not in folds
        and not has_bias(module.get_base_layer())
    }
    for _, consumers in folds.values():
        for consumer in consumers:
            layer = base.get_submodule(consumer)
            layer = layer.get_base_layer() if isinstance(layer, BitFitLayer) else layer
            if not has_bias(layer):
                needed[f"{consumer}.bias"] = (layer.out_features,)
    flags = _bias_flags(base, needed) if needed else []
    target = _parameter_shapes(base, _with_flags(base.config, flags)) if needed else {}
    missing = [key.removesuffix(".bias") for key, shape in needed.items() if target.get(key) != shape]
    if missing:
        raise ValueError(
            f"BitFit adapter {adapter_name!r} cannot be exported as a stock {type(base).__name__}: these layers got a "
            f"bias (their own, or one folded in from the norm before them) that the architecture has no place for "
            f"(no option of {type(base.config).__name__} gives them one): {_missing_bias_report(base, missing)}. "
            "Keep it as a peftlab adapter (save_pretrained), or train without those layers (add_missing_biases=False, "
            "exclude_modules or bias_terms)."
        )

    gained = folded_contributions(base, folds)
    clone = copy.deepcopy(model)
    clone.set_adapter(adapter_name)
    for name in folds:  # its delta now lives in `gained`; the norm itself is exported unchanged
        del clone.get_base_model().get_submodule(name).bitfit_bias[adapter_name]
    _unwrap_saved_modules(clone.get_base_model(), adapter_name)
    merged = clone.merge_and_unload(adapter_names=[adapter_name])
    for consumer, extra in gained.items():
        add_to_bias(merged.get_submodule(consumer), extra)
    for flag in flags:
        setattr(merged.config, flag, True)
    present = dict(merged.named_parameters())
    for key, shape in target.items():
        if key.endswith(".bias") and key not in present:
            # a layer the switch gives a bias that BitFit did not train: a zero bias leaves its output unchanged
            layer = merged.get_submodule(key.removesuffix(".bias"))
            layer.bias = nn.Parameter(torch.zeros(shape, dtype=layer.weight.dtype, device=layer.weight.device))
    merged.save_pretrained(folder)


def _unwrap_saved_modules(base: nn.Module, adapter_name: str) -> None:
    """Put each trained `modules_to_save` copy (the task head) in its wrapper's place.

    peft 0.21.2's merge_and_unload copies `.weight` from the wrapper onto the module it unwraps
    (BaseTuner._replace_module), which fails for a head that has none (RoBERTa's classification head)."""
    wrapped = [(name, module) for name, module in base.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for name, wrapper in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, wrapper.modules_to_save[adapter_name])

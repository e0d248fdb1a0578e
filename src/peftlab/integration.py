"""The one place where peftlab extends stock Hugging Face PEFT from outside (no fork).

PEFT 0.21 has `register_peft_method`, but it only accepts names that are already members of its `PeftType`
enum, and a few code paths dispatch on hard-coded prompt-learning types. Everything that bridges those gaps
lives here, and each patch below names the upstream gap it closes. Every process that builds or loads a
peftlab adapter must `import peftlab` first (DataLoader workers, torchrun ranks, a fresh interpreter).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import importlib.metadata
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.peft_model import (
    PeftModelForCausalLM,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForTokenClassification,
)
from peft.utils import ModulesToSaveWrapper, PeftType, TaskType, register_peft_method
from peft.utils import save_and_load as _peft_save_and_load
from transformers import PreTrainedModel

try:
    _PEFTLAB_VERSION: str | None = importlib.metadata.version("peftlab")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    _PEFTLAB_VERSION = None

# peft types that peftlab registered, and those of them whose prompt encoder is a peftlab class; filled by
# `register_method`
PEFTLAB_TYPES: set[PeftType] = set()
PEFTLAB_PROMPT_TYPES: set[PeftType] = set()


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to PEFT's `PeftType` str-enum so that `PeftType(name)`, JSON configs and the mappings accept it.

    Upstream gap: there is no plugin path for new types, and `register_peft_method` refuses names that are not
    already enum members. A plain string as `peft_type` would break code that calls `.peft_type.value`.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_method(name: str, config_cls: type, model_cls: type, *, prompt_learning: bool = False) -> PeftType:
    """Register a peftlab method under the upper-case type `name` (e.g. "BITFIT") with stock PEFT."""
    peft_type = _extend_peft_type(name)
    PEFTLAB_TYPES.add(peft_type)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:  # importing twice (e.g. importlib.reload) is harmless
        return peft_type
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls)
    if prompt_learning:
        PEFTLAB_PROMPT_TYPES.add(peft_type)
    return peft_type


# --- Saved adapters say how to load them ----------------------------------------------------------------------
# Without `import peftlab`, stock PEFT fails on a peftlab adapter with a bare `KeyError: '<TYPE>'`: it indexes its
# type -> config-class dict with the saved `peft_type` (PeftModel.from_pretrained, PeftConfig.from_peft_type) before
# reading anything else, so nothing in the saved files can change that message. What can be done: the files say it.
# These two fields land in every peftlab adapter_config.json (next to "peft_type", as the keys are sorted); with
# peftlab imported they are ordinary fields of the config classes, so loading accepts them without a warning. The
# model card says the same (see `_model_card_names_peftlab`).
LOADING_NOTE = (
    "this adapter's peft_type is added to PEFT by the peftlab package: run `import peftlab` before loading it "
    "(PeftModel.from_pretrained, AutoPeftModelFor*); without it PEFT fails with KeyError: '<peft_type>'"
)


@dataclass
class PeftlabConfigMixin:
    """Base of every peftlab config class: the loading instructions saved in adapter_config.json."""

    peftlab_version: str | None = field(
        default=_PEFTLAB_VERSION, metadata={"help": "peftlab version that created this config (set automatically)"}
    )
    peftlab_loading: str = field(default=LOADING_NOTE, metadata={"help": "How to load this adapter (informative)"})


def _is_peftlab_prompt(model: PeftModel) -> bool:
    return model.active_peft_config.peft_type in PEFTLAB_PROMPT_TYPES


# --- Patch 1: prompt encoders --------------------------------------------------------------------------------
# Upstream gap: `PeftModel._setup_prompt_encoder` builds encoders by a hard-coded list of types and raises
# ValueError("Not supported") for any other. For peftlab prompt types we build the registered encoder class
# with the model's input embeddings; stock types go through the original code untouched. This is also where a
# peftlab prompt config is checked for the values it may leave unset at construction (`check_complete`).
_stock_setup_prompt_encoder = PeftModel._setup_prompt_encoder


def _setup_prompt_encoder(self: PeftModel, adapter_name: str) -> None:
    config = self.peft_config[adapter_name]
    if config.peft_type not in PEFTLAB_PROMPT_TYPES:
        return _stock_setup_prompt_encoder(self, adapter_name)
    config.check_complete()
    if not hasattr(self, "prompt_encoder"):
        self.prompt_encoder = torch.nn.ModuleDict({})
        self.prompt_tokens = {}
    for name, module in self.base_model.named_children():
        module.requires_grad_(False)
        if isinstance(module, PreTrainedModel) and not hasattr(self, "transformer_backbone_name"):
            self.transformer_backbone_name = name
    if config.num_transformer_submodules is None:
        # The papers prompt the encoder only, also for encoder-decoder models (stock PEFT defaults to 2 there).
        config.num_transformer_submodules = 1
    self.word_embeddings = self.base_model.get_input_embeddings()
    encoder = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type](config, self.word_embeddings)
    self.prompt_encoder.update(torch.nn.ModuleDict({adapter_name: encoder.to(self.device)}))
    self.prompt_tokens[adapter_name] = torch.arange(
        config.num_virtual_tokens * config.num_transformer_submodules
    ).long()


# --- Patch 2: encoder-decoder forward and generate -----------------------------------------------------------
# Upstream gap: `PeftModelForSeq2SeqLM.forward` sends any prompt type other than PROMPT_TUNING/P_TUNING down the
# multitask branch (decoder prompted too, TypeError with decoder_input_ids), and `generate` raises
# NotImplementedError. A peftlab prompt method whose encoder returns prompt embeddings behaves exactly like
# PROMPT_TUNING in those two methods, so for their duration the active config is presented as PROMPT_TUNING.
@contextlib.contextmanager
def _presented_as_prompt_tuning(model: PeftModel) -> Iterator[None]:
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    presented = copy.copy(config)
    presented.peft_type = PeftType.PROMPT_TUNING
    model.peft_config[adapter] = presented
    try:
        yield
    finally:
        model.peft_config[adapter] = config


def warn_if_task_type_unset(config) -> None:
    """Construction-time hint for a peftlab prompt config built without `task_type` (allowed, as stock configs build
    with their defaults): stock `get_peft_model` indexes its model classes by task type for every prompt-learning
    config and fails with a bare `KeyError: None` before any peftlab code runs."""
    if config.task_type is None:
        warnings.warn(
            f"{type(config).__name__}.task_type is None: set it (e.g. 'SEQ_CLS', 'CAUSAL_LM') before get_peft_model, "
            "which otherwise raises KeyError: None",
            stacklevel=4,  # the caller of the config class: this function, __post_init__, the dataclass __init__
        )


def check_prompt_values_set(config) -> None:
    """Use-time check of a peftlab prompt config, run when its adapter is built (PeftModel, from_pretrained).

    peftlab's configs build with their defaults like stock ones (`PeftConfig.from_peft_type`, dataclass tooling), so
    `task_type` and `num_virtual_tokens` may still be None; an adapter cannot be built without them, and without a
    task type PeftModel's generic forward would silently ignore the prompt."""
    name = type(config).__name__
    tasks = [task.value for task in TaskType]
    if config.task_type not in tasks:
        raise ValueError(f"{name}.task_type must be one of {', '.join(tasks)}, got {config.task_type!r}")
    tokens = config.num_virtual_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {tokens!r}")


def check_encoder_only_prompt(config) -> None:
    """Config-time check for peftlab prompt types: through this patch they take PROMPT_TUNING's seq2seq path, which
    prepends the prompt to the encoder input only, so a decoder prompt would be trained nowhere (and could not be
    exported as a stock PROMPT_TUNING adapter)."""
    if config.num_transformer_submodules not in (None, 1):
        raise ValueError(
            f"{type(config).__name__}.num_transformer_submodules must be 1 or None (the prompt goes to the encoder "
            f"input only, the papers' setting); decoder prompts are not supported, got "
            f"{config.num_transformer_submodules!r}"
        )


def _as_prompt_tuning_in_seq2seq(stock_method):
    @functools.wraps(stock_method)
    def method(self, *args, **kwargs):
        if not _is_peftlab_prompt(self):
            return stock_method(self, *args, **kwargs)
        with _presented_as_prompt_tuning(self):
            return stock_method(self, *args, **kwargs)

    return method


# --- Patch 3: token classification and extractive QA targets ------------------------------------------------
# Upstream gap: with prompt learning the outputs gain `num_virtual_tokens` leading positions, but stock PEFT passes
# token labels unpadded (shape mismatch in the loss) and QA start/end positions unshifted (silently wrong loss).
# For peftlab prompt types, labels are left-padded with -100 and positions shifted by the prompt length; the outputs
# keep stock PEFT's layout (virtual positions first), so they match an exported PROMPT_TUNING adapter.
def _num_prompt_positions(model: PeftModel) -> int:
    return model.active_peft_config.num_virtual_tokens


def _token_cls_forward(stock_forward):
    @functools.wraps(stock_forward)
    def forward(self, *args, labels=None, **kwargs):
        if labels is not None and _is_peftlab_prompt(self):
            pad = labels.new_full((labels.shape[0], _num_prompt_positions(self)), -100)
            labels = torch.cat((pad, labels), dim=1)
        return stock_forward(self, *args, labels=labels, **kwargs)

    return forward


def _qa_forward(stock_forward):
    @functools.wraps(stock_forward)
    def forward(self, *args, start_positions=None, end_positions=None, **kwargs):
        if _is_peftlab_prompt(self):
            shift = _num_prompt_positions(self)
            start_positions = None if start_positions is None else start_positions + shift
            end_positions = None if end_positions is None else end_positions + shift
        return stock_forward(self, *args, start_positions=start_positions, end_positions=end_positions, **kwargs)

    return forward


# --- Patch 4: disable_adapter of peftlab prompt methods ---------------------------------------------------------
# Upstream gaps (peft 0.21.2, PeftModel.disable_adapter for prompt learning): it swaps `forward` and
# `prepare_inputs_for_generation` only, so (1) encoder models (BERT, RoBERTa classifiers), which have no
# `prepare_inputs_for_generation`, raise AttributeError and then an UnboundLocalError from its own `finally`;
# (2) the trained task head (modules_to_save) stays active, so a classifier's outputs are not the base model's;
# (3) seq2seq `generate` builds the prompted encoder input itself, so disabled generations keep the prompt.
# Stock PROMPT_TUNING has all three; stock types keep stock PEFT's behaviour (importing peftlab changes nothing for
# them). For peftlab prompt types this runs `forward` and `generate` of the base model and switches the saved-module
# wrappers to the original modules (their requires_grad flags restored after).
def _disable_adapter(stock_disable_adapter):
    @functools.wraps(stock_disable_adapter)
    @contextlib.contextmanager
    def disable_adapter(self):
        if not _is_peftlab_prompt(self):
            with stock_disable_adapter(self):
                yield
            return
        heads = [m for m in self.modules() if isinstance(m, ModulesToSaveWrapper) and not m.disable_adapters]
        grad_flags = [(p, p.requires_grad) for head in heads for p in head.parameters()]
        swapped = {
            name: getattr(self.base_model, name) for name in ("forward", "generate") if hasattr(self.base_model, name)
        }
        shadowed = {name: self.__dict__[name] for name in swapped if name in self.__dict__}
        was_disabled = self._adapters_disabled
        try:
            self.__dict__.update(swapped)
            for head in heads:
                head.enable_adapters(False)
            self._adapters_disabled = True
            yield
        finally:
            for name in swapped:
                self.__dict__.pop(name, None)
            self.__dict__.update(shadowed)
            for head in heads:
                head.enable_adapters(True)
            for parameter, flag in grad_flags:
                parameter.requires_grad_(flag)
            self._adapters_disabled = was_disabled

    return disable_adapter


# --- Patch 5: the model card of a saved adapter ----------------------------------------------------------------
# Upstream gap: `PeftModel.create_or_update_model_card` (run by save_pretrained and Trainer.push_to_hub) tags the card
# "peft" only, so a card of a peftlab adapter does not say that loading it needs peftlab. For models with a peftlab
# adapter a "peftlab" tag and a loading section are added once; cards of stock adapters are left as PEFT writes them.
MODEL_CARD_HEADING = "## Loading this adapter (peftlab)"


def _model_card_names_peftlab(stock_method):
    @functools.wraps(stock_method)
    def create_or_update_model_card(self, output_dir: str) -> None:
        stock_method(self, output_dir)
        types = sorted({c.peft_type.value for c in self.peft_config.values() if c.peft_type in PEFTLAB_TYPES})
        if not types:
            return
        filename = os.path.join(output_dir, "README.md")
        card = ModelCard.load(filename)
        card.data["tags"] = sorted({*(card.data.get("tags") or []), "peftlab"})
        if MODEL_CARD_HEADING not in card.text.splitlines():
            names = ", ".join(types)
            card.text = (
                f"{card.text.rstrip()}\n\n{MODEL_CARD_HEADING}\n\n"
                f"The PEFT type {names} is not part of stock PEFT: it is added by the peftlab package. Import "
                f"peftlab before loading (without it PEFT fails with `KeyError: '{types[0]}'`):\n\n"
                "```python\nimport peftlab  # registers the peftlab methods with PEFT\nfrom peft import PeftModel\n\n"
                'model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")\n```\n'
            )
        card.save(filename)

    return create_or_update_model_card


# --- Patch 8: cached generation of peftlab prompt methods in causal LMs ----------------------------------------------
# Upstream gap (peft 0.21.2 with transformers >= 5.2x, which renamed the generation kwarg `past_key_values` to
# `cache`): `PeftModelForCausalLM.prepare_inputs_for_generation` looks for the cache under `past_key_values`, finds
# none at every step, and injects the prompt again before each new token, so every cached step appends another copy
# of the virtual tokens to the KV cache and cached greedy generation departs from uncached generation (and from the
# training forward). Stock PROMPT_TUNING has the same gap; stock types keep stock PEFT's behaviour. For peftlab
# prompt types the base model's prepared inputs are shown to the stock code under the old name, and the result is
# handed back to transformers under the new one; with a transformers that still uses the old name nothing changes.
_NEW_CACHE_KWARG, _OLD_CACHE_KWARG = "cache", "past_key_values"


def _renamed(kwargs: dict, old: str, new: str) -> dict:
    if old in kwargs and new not in kwargs:
        kwargs[new] = kwargs.pop(old)
    return kwargs


def _prompt_cache_under_stock_name(stock_method):
    @functools.wraps(stock_method)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        if not _is_peftlab_prompt(self):
            return stock_method(self, *args, **kwargs)
        base_prepare = self.base_model_prepare_inputs_for_generation
        self.base_model_prepare_inputs_for_generation = lambda *a, **k: _renamed(
            base_prepare(*a, **k), _NEW_CACHE_KWARG, _OLD_CACHE_KWARG
        )
        try:
            model_kwargs = stock_method(self, *args, **kwargs)
        finally:
            self.base_model_prepare_inputs_for_generation = base_prepare
        return _renamed(model_kwargs, _OLD_CACHE_KWARG, _NEW_CACHE_KWARG)

    return prepare_inputs_for_generation


def _install_patches() -> None:
    if getattr(PeftModel, "_peftlab_patched", False):
        return
    PeftModel._setup_prompt_encoder = _setup_prompt_encoder
    PeftModelForSeq2SeqLM.forward = _as_prompt_tuning_in_seq2seq(PeftModelForSeq2SeqLM.forward)
    PeftModelForSeq2SeqLM.generate = _as_prompt_tuning_in_seq2seq(PeftModelForSeq2SeqLM.generate)
    PeftModelForTokenClassification.forward = _token_cls_forward(PeftModelForTokenClassification.forward)
    PeftModelForQuestionAnswering.forward = _qa_forward(PeftModelForQuestionAnswering.forward)
    PeftModel.create_or_update_model_card = _model_card_names_peftlab(PeftModel.create_or_update_model_card)
    PeftModel.disable_adapter = _disable_adapter(PeftModel.disable_adapter)
    PeftModelForCausalLM.prepare_inputs_for_generation = _prompt_cache_under_stock_name(
        PeftModelForCausalLM.prepare_inputs_for_generation
    )
    PeftModel._peftlab_patched = True


_install_patches()


# --- Patch 6: pickled adapter weights --------------------------------------------------------------------------
# Upstream gap: when a folder has no adapter_model.safetensors, `peft.utils.save_and_load.load_peft_weights` falls
# back to a pickled adapter_model.bin and unpickles it without asking (with torch.load(weights_only=True): a restricted
# unpickler that blocks arbitrary objects, but still a pickle from a possibly untrusted source). peftlab's own adapter
# types never had a pickle format, so their pickles are refused unless the caller opts in with
# `allow_pickled_adapters()`. Stock types keep stock PEFT's behaviour (importing peftlab must not break loading a
# user's old LoRA .bin), unless the user asks for the refusal everywhere with `refuse_pickled_adapters()`.
# The type is read from the adapter_config.json beside the pickle: PEFT reads config and weights from the same
# folder (or the same Hub snapshot folder), and deciding must not unpickle anything.
_pickled_adapters_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("pickled_adapters", default=False)
_refuse_every_pickle = False


@contextlib.contextmanager
def allow_pickled_adapters() -> Iterator[None]:
    """Within this block, PEFT may load pickled (.bin) adapter weights, as stock PEFT does: only for trusted files."""
    token = _pickled_adapters_allowed.set(True)
    try:
        yield
    finally:
        _pickled_adapters_allowed.reset(token)


def refuse_pickled_adapters(everywhere: bool = True) -> None:
    """Process-wide: refuse pickled adapter weights of every PEFT type (LoRA too), not only peftlab's own types.

    `everywhere=False` restores the default. `allow_pickled_adapters()` still lets a trusted file through."""
    global _refuse_every_pickle
    if not isinstance(everywhere, bool):
        raise ValueError(f"refuse_pickled_adapters: everywhere must be True or False, got {everywhere!r}")
    _refuse_every_pickle = everywhere


def _peft_type_beside(weights_file: object) -> str | None:
    """The `peft_type` in the adapter_config.json next to `weights_file`, or None if there is none to read."""
    if not isinstance(weights_file, str | os.PathLike):
        return None
    config_file = os.path.join(os.path.dirname(os.fspath(weights_file)), "adapter_config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return peft_type if isinstance(peft_type, str) else None


def _refusing_pickles(stock_torch_load):
    @functools.wraps(stock_torch_load)
    def torch_load(*args, **kwargs):
        source = args[0] if args else kwargs.get("f")
        refused = _refuse_every_pickle or _peft_type_beside(source) in {t.value for t in PEFTLAB_TYPES}
        if refused and not _pickled_adapters_allowed.get():
            raise ValueError(
                f"refusing to load pickled adapter weights from {source}: pickle files can carry code, and peftlab "
                "loads them only on request (always for peftlab's own adapter types; for every type after "
                "peftlab.refuse_pickled_adapters()). Save adapters as safetensors (the default of save_pretrained), "
                "or, for a file you trust, load it inside `with peftlab.allow_pickled_adapters(): ...`"
            )
        return stock_torch_load(*args, **kwargs)

    torch_load._peftlab_refuses_pickles = True
    return torch_load


if not getattr(_peft_save_and_load.torch_load, "_peftlab_refuses_pickles", False):
    # load_peft_weights looks this module global up at call time, whoever imported load_peft_weights
    _peft_save_and_load.torch_load = _refusing_pickles(_peft_save_and_load.torch_load)


# --- Patch 7: UniPELT prefix keys/values inside transformers' attention dispatch -------------------------------------
# Upstream gap: transformers has no extension point for extra key/value positions inside attention (prefix tuning via
# `past_key_values` is dropped by `generate()` for LLaMA/T5 and refused by BERT classification), and registering a
# function under "eager" in the `AttentionInterface` replaces EVERY model's own eager attention (the `default` that
# each model passes to `get_interface`), which breaks models whose file has no module-level `eager_attention_forward`
# (TimesFM, llama4 vision, phi4 multimodal) once such a registration exists. Instead `get_interface` itself is wrapped:
# for "eager" and "sdpa" it returns whatever transformers resolved (for eager, the model's own function), wrapped by
# `peftlab.methods.unipelt.attention.with_prefix`, which passes every call of an attention module without a UniPELT
# prefix straight through to that function. Imported here, at the end, because that module imports this one.
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from peftlab.methods.unipelt.attention import SUPPORTED_ATTENTION, with_prefix  # noqa: E402

_stock_get_interface = AttentionInterface.get_interface


def _get_interface_with_prefix(self, attn_implementation: str, default):
    function = _stock_get_interface(self, attn_implementation, default)
    return with_prefix(function) if attn_implementation in SUPPORTED_ATTENTION else function


if not getattr(_stock_get_interface, "_peftlab_unipelt_prefix", False):
    _get_interface_with_prefix._peftlab_unipelt_prefix = True
    AttentionInterface.get_interface = functools.wraps(_stock_get_interface)(_get_interface_with_prefix)

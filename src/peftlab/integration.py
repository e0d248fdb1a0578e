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
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.peft_model import (
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForTokenClassification,
)
from peft.utils import ModulesToSaveWrapper, PeftType, register_peft_method
from peft.utils import save_and_load as _peft_save_and_load
from transformers import PreTrainedModel

# peft types whose prompt encoder is a peftlab class; filled by `register_method(..., prompt_learning=True)`
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
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:  # importing twice (e.g. importlib.reload) is harmless
        return peft_type
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls)
    if prompt_learning:
        PEFTLAB_PROMPT_TYPES.add(peft_type)
    return peft_type


def _is_peftlab_prompt(model: PeftModel) -> bool:
    return model.active_peft_config.peft_type in PEFTLAB_PROMPT_TYPES


# --- Patch 1: prompt encoders --------------------------------------------------------------------------------
# Upstream gap: `PeftModel._setup_prompt_encoder` builds encoders by a hard-coded list of types and raises
# ValueError("Not supported") for any other. For peftlab prompt types we build the registered encoder class
# with the model's input embeddings; stock types go through the original code untouched.
_stock_setup_prompt_encoder = PeftModel._setup_prompt_encoder


def _setup_prompt_encoder(self: PeftModel, adapter_name: str) -> None:
    config = self.peft_config[adapter_name]
    if config.peft_type not in PEFTLAB_PROMPT_TYPES:
        return _stock_setup_prompt_encoder(self, adapter_name)
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


# --- Patch 3b: disable_adapter of prompt methods ---------------------------------------------------------------
# Upstream gaps (peft 0.21.2, PeftModel.disable_adapter for prompt learning): it swaps `forward` and
# `prepare_inputs_for_generation` only, so (1) encoder models (BERT, RoBERTa classifiers), which have no
# `prepare_inputs_for_generation`, raise AttributeError and then an UnboundLocalError from its own `finally`;
# (2) the trained task head (modules_to_save) stays active, so a classifier's outputs are not the base model's;
# (3) seq2seq `generate` builds the prompted encoder input itself, so disabled generations keep the prompt.
# Stock PROMPT_TUNING has all three. For every prompt-learning type this runs `forward` and `generate` of the base
# model and switches the saved-module wrappers to the original modules (their requires_grad flags restored after).
def _disable_adapter(stock_disable_adapter):
    @functools.wraps(stock_disable_adapter)
    @contextlib.contextmanager
    def disable_adapter(self):
        if not self.active_peft_config.is_prompt_learning:
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


def _install_patches() -> None:
    if getattr(PeftModel, "_peftlab_patched", False):
        return
    PeftModel._setup_prompt_encoder = _setup_prompt_encoder
    PeftModelForSeq2SeqLM.forward = _as_prompt_tuning_in_seq2seq(PeftModelForSeq2SeqLM.forward)
    PeftModelForSeq2SeqLM.generate = _as_prompt_tuning_in_seq2seq(PeftModelForSeq2SeqLM.generate)
    PeftModelForTokenClassification.forward = _token_cls_forward(PeftModelForTokenClassification.forward)
    PeftModelForQuestionAnswering.forward = _qa_forward(PeftModelForQuestionAnswering.forward)
    PeftModel.disable_adapter = _disable_adapter(PeftModel.disable_adapter)
    PeftModel._peftlab_patched = True


_install_patches()


# --- Patch 4: pickled adapter weights --------------------------------------------------------------------------
# Upstream gap: when a folder has no adapter_model.safetensors, `peft.utils.save_and_load.load_peft_weights` falls
# back to a pickled adapter_model.bin and unpickles it without asking (with torch.load(weights_only=True): a restricted
# unpickler that blocks arbitrary objects, but still a pickle from a possibly untrusted source). After `import peftlab`
# loading a pickled adapter (any PEFT type) is refused unless the caller opts in with `allow_pickled_adapters()`.
_pickled_adapters_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("pickled_adapters", default=False)


@contextlib.contextmanager
def allow_pickled_adapters() -> Iterator[None]:
    """Within this block, PEFT may load pickled (.bin) adapter weights, as stock PEFT does: only for trusted files."""
    token = _pickled_adapters_allowed.set(True)
    try:
        yield
    finally:
        _pickled_adapters_allowed.reset(token)


def _refusing_pickles(stock_torch_load):
    @functools.wraps(stock_torch_load)
    def torch_load(*args, **kwargs):
        if not _pickled_adapters_allowed.get():
            source = args[0] if args else kwargs.get("f")
            raise ValueError(
                f"refusing to load pickled adapter weights from {source}: pickle files can carry code and are only "
                "loaded on request. Save adapters as safetensors (the default of save_pretrained), or, for a file you "
                "trust, load it inside `with peftlab.allow_pickled_adapters(): ...`"
            )
        return stock_torch_load(*args, **kwargs)

    torch_load._peftlab_refuses_pickles = True
    return torch_load


if not getattr(_peft_save_and_load.torch_load, "_peftlab_refuses_pickles", False):
    # load_peft_weights looks this module global up at call time, whoever imported load_peft_weights
    _peft_save_and_load.torch_load = _refusing_pickles(_peft_save_and_load.torch_load)

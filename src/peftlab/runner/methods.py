"""The method map (the original project's `AUTO_PEFT`): method name -> PEFT config class and its command-line options.

Adding a method is one `METHODS` entry. Its options are fields of its PEFT config class; their flag types and help
texts are read from the config dataclass, so `peftlab train --help` lists them and a flag reaches only the methods
that declare it (a flag of another method is an error, see `check_method_flags`).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from peft import (
    BeftConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)

from peftlab.methods.bitfit import BitFitConfig
from peftlab.methods.residual_prompt_tuning import ResidualPromptTuningConfig
from peftlab.methods.unipelt import UniPELTConfig
from peftlab.methods.xprompt import XPromptConfig
from peftlab.runner.errors import InputError
from peftlab.runner.models import DECODER, ENCODER_DECODER, FAMILIES

# (token_ratio, piece_ratio) pairs the runner's XPrompt tries, one pruning round each, the best chosen on dev
XPROMPT_RATIO_PAIRS = ((0.25, 0.25), (0.5, 0.25))
_UNIPELT_OPTIONS = (
    "adapter_placement",
    "use_gates",
    "gate_ignores_padding",
    "lora_r",
    "prefix_length",
    "prefix_hidden_size",
    "adapter_reduction_factor",
)


def _xprompt_train(trainer: Any, resume_from_checkpoint: str | None) -> Any:
    """XPrompt's whole pipeline with the run's Trainer: stage 1, then per ratio pair score -> prune -> rewind ->
    retrain with the same schedule and a fresh optimizer; the pair with the best dev score is kept."""
    from peftlab import xprompt

    if resume_from_checkpoint:
        raise InputError("method 'xprompt' trains in several stages and cannot resume from a checkpoint; start afresh")
    outputs = []

    def train(model: Any) -> None:
        trainer.optimizer, trainer.lr_scheduler = None, None  # every stage: the same schedule, a fresh optimizer
        outputs.append(trainer.train())

    xprompt.run(
        trainer.model,
        train=train,
        evaluate=lambda model: trainer.evaluate()["eval_score"],
        score_data=trainer.get_train_dataloader(),
        ratio_pairs=XPROMPT_RATIO_PAIRS,
    )
    return outputs[-1]


@dataclass(frozen=True)
class MethodSpec:
    """How the runner builds one method.

    config_cls: the PEFT config class (None: full fine-tuning, every weight trained, no adapter).
    options: config fields exposed as `--flags`.
    defaults: runner defaults that differ from the config class's own (e.g. a prompt length).
    families: model families the method works on.
    learning_rate: a typical learning rate, used by `peftlab demo` and as a sweep's default grid.
    train: for a method whose training is more than one `Trainer.train` call (e.g. XPrompt: train, score, prune,
        rewind, retrain): `train(trainer, resume_from_checkpoint)` runs it and returns the final `TrainOutput`.
    default_targets: the method's default `target_modules` by model_type (peft's mapping), so that a model type
        without defaults is refused before loading; None when the method picks its modules itself.
    """

    config_cls: type[PeftConfig] | None
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES
    learning_rate: float = 5e-4
    train: Callable[[Any, str | None], Any] | None = None
    default_targets: Mapping[str, Any] | None = None

    @property
    def prompt_learning(self) -> bool:
        """Soft-prompt methods: their prompt length (`num_virtual_tokens`) must be at least 1."""
        return self.config_cls is not None and issubclass(self.config_cls, PromptLearningConfig)


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(None, learning_rate=5e-5),  # full fine-tuning, the baseline
    "prompt_tuning": MethodSpec(
        PromptTuningConfig,
        ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"),
        # prompt rows start as sampled vocabulary embeddings (Lester et al.), not peft's random default
        {"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"},
        learning_rate=3e-1,
    ),
    "p_tuning": MethodSpec(
        PromptEncoderConfig,
        (
            "num_virtual_tokens",
            "encoder_reparameterization_type",
            "encoder_hidden_size",
            "encoder_num_layers",
            "encoder_dropout",
        ),
        {"num_virtual_tokens": 20},
        learning_rate=1e-2,
    ),
    # BERT-style encoders reject past key values in transformers 5 ("Model does not support past key values")
    "prefix_tuning": MethodSpec(
        PrefixTuningConfig,
        ("num_virtual_tokens", "encoder_hidden_size", "prefix_projection"),
        {"num_virtual_tokens": 20},
        families=(ENCODER_DECODER, DECODER),
        learning_rate=1e-2,
    ),
    "lora": MethodSpec(
        LoraConfig,
        ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"),
        {"lora_alpha": 16},
        learning_rate=5e-4,
        default_targets=TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    ),
    "ia3": MethodSpec(
        IA3Config,
        ("target_modules", "feedforward_modules"),
        learning_rate=3e-3,
        default_targets=TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    ),
    "beft": MethodSpec(
        BeftConfig,
        ("target_modules",),
        learning_rate=1e-3,
        default_targets=TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING,
    ),
    # peftlab's methods
    "bitfit": MethodSpec(
        BitFitConfig,
        ("bias_terms", "add_missing_biases"),
        learning_rate=1e-3,
    ),
    "residual_prompt_tuning": MethodSpec(
        ResidualPromptTuningConfig,
        (
            "num_virtual_tokens",
            "prompt_tuning_init",
            "prompt_tuning_init_text",
            "encoder_bottleneck_size",
            "encoder_layer_norm",
            "encoder_dropout",
            "encoder_nonlinearity",
            "encoder_separate",
            "encoder_residual",
        ),
        learning_rate=3e-1,
    ),
    "unipelt": MethodSpec(
        UniPELTConfig,
        _UNIPELT_OPTIONS,
        learning_rate=5e-4,
    ),
    "unipelt_ap": MethodSpec(
        UniPELTConfig,
        _UNIPELT_OPTIONS,
        {"components": ("adapter", "prefix")},
        learning_rate=5e-4,
    ),
    # prompt tuning, then the pruning pairs of XPROMPT_RATIO_PAIRS, the best chosen on dev
    "xprompt": MethodSpec(
        XPromptConfig,
        ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "num_pieces"),
        {"num_virtual_tokens": 20},
        learning_rate=3e-1,
        train=_xprompt_train,
    ),
}


@dataclass(frozen=True)
class OptionType:
    """The command-line type of a config field: int/float/str/bool, a list of str, or a str from `choices`."""

    base: type
    is_list: bool = False
    choices: tuple[str, ...] | None = None
    bool_choice: bool = False  # a `bool | Literal[...]` field: "true"/"false" become booleans
    as_tuple: bool = False  # a `tuple[str, ...]` field: the list becomes a tuple

    def convert(self, name: str, value: Any) -> Any:
        """The parsed flag value as this config field wants it (the flag may be wider, e.g. float for int)."""
        if self.bool_choice and value in ("true", "false"):
            return value == "true"
        if self.as_tuple:
            return tuple(value)
        if self.base is int and isinstance(value, float):
            if not value.is_integer():
                raise InputError(f"--{name} must be a whole number, got {value}")
            return int(value)
        return value


def _option_type(config_cls: type, name: str) -> OptionType:
    """Map a config field's annotation to a flag type (Optional stripped, `list[str] | str` -> list of str)."""
    hint = typing.get_type_hints(config_cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Union, types.UnionType) and bool in args:
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if len(args) == 2 and literals:
            choices = ("true", "false", *(str(v) for v in typing.get_args(literals[0])))
            return OptionType(str, choices=choices, bool_choice=True)
    if typing.get_origin(hint) in (Union, types.UnionType):
        non_str = [a for a in args if a is not str]
        hint = non_str[0] if len(non_str) == 1 else (str if not non_str else hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return OptionType(str, choices=tuple(str(a) for a in typing.get_args(hint)))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return OptionType(str, choices=tuple(m.value for m in hint))
    if origin is list and typing.get_args(hint) == (str,):
        return OptionType(str, is_list=True)
    if origin is tuple and typing.get_args(hint) == (str, ...):
        return OptionType(str, is_list=True, as_tuple=True)
    if hint in (int, float, str, bool):
        return OptionType(hint)
    raise TypeError(f"{config_cls.__name__}.{name}: annotation {hint!r} has no command-line form")


def _flag_type(option_type: OptionType) -> OptionType:
    """What the shared flag parses (a tuple field reads a list like any list field)."""
    return dataclasses.replace(option_type, as_tuple=False)


def _config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def method_options() -> dict[str, tuple[OptionType, str]]:
    """Every method option of the map: name -> (flag type, help). One name has one type across methods."""
    options: dict[str, tuple[OptionType, str]] = {}
    owners: dict[str, str] = {}
    for method, spec in METHODS.items():
        fields = _config_fields(spec.config_cls) if spec.config_cls else {}
        for name in spec.options:
            if name not in fields:
                raise TypeError(f"method {method!r} exposes {name!r}, which {spec.config_cls.__name__} lacks")
            option_type = _flag_type(_option_type(spec.config_cls, name))
            if name in options and options[name][0] != option_type:
                if {options[name][0].base, option_type.base} != {int, float}:
                    raise TypeError(f"option {name!r} has different types in methods {owners[name]!r} and {method!r}")
                option_type = OptionType(float)  # e.g. lora_alpha: int for LoRA, float elsewhere
            help_text = fields[name].metadata.get("help", "").replace("%", "%%")  # argparse formats help
            owners.setdefault(name, method)
            users = [m for m, s in METHODS.items() if name in s.options]
            options[name] = (option_type, f"[{', '.join(users)}] {help_text}".strip())
    return options


def method_key(name: str) -> str:
    """The map's name of a method (`LoRA`, `prompt-tuning` are accepted); unknown -> InputError."""
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        raise InputError(f"unknown method --peft_type {name!r}; allowed: {', '.join(METHODS)}")
    return key


def get_method(name: str) -> MethodSpec:
    return METHODS[method_key(name)]


def check_method_flags(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Return the chosen method's option values (runner defaults filled in); error on another method's flag.

    given: option name -> value for every method option that was set (None means not given).
    """
    spec = get_method(method)
    stray = sorted(name for name, value in given.items() if value is not None and name not in spec.options)
    if stray:
        own = ", ".join(f"--{o}" for o in spec.options) or "none"
        raise InputError(f"--{stray[0]} is not an option of method {method!r} (its options: {own})")
    values = dict(spec.defaults)
    values.update(
        {
            name: _option_type(spec.config_cls, name).convert(name, value)
            for name, value in given.items()
            if value is not None and name in spec.options
        }
    )
    length = values.get("num_virtual_tokens")
    if spec.prompt_learning and length is not None and length < 1:
        raise InputError(
            f"--num_virtual_tokens {length} is not allowed for method {method!r}; allowed: a prompt length >= 1"
        )
    return values


def check_method_family(method: str, family: str, model_type: str, options: Mapping[str, Any]) -> None:
    """Refuse, before loading weights, a method that cannot run on this model family or architecture."""
    spec = get_method(method)
    if family not in spec.families:
        raise InputError(
            f"method {method!r} cannot run on {family} models (model_type {model_type!r}); "
            f"it supports: {', '.join(spec.families)}"
        )
    if (
        spec.default_targets is not None
        and not options.get("target_modules")
        and model_type not in spec.default_targets
    ):
        raise InputError(
            f"method {method!r} has no default target modules for model_type {model_type!r}; "
            "pass --target_modules (names of linear layers, e.g. c_attn for gpt2)"
        )


def build_peft_config(method: str, task_type: str, options: Mapping[str, Any], model_path: str) -> PeftConfig | None:
    """The PEFT config for `method` (None for full fine-tuning)."""
    spec = get_method(method)
    if spec.config_cls is None:
        return None
    kwargs = dict(options)
    if kwargs.get("prompt_tuning_init") == "TEXT":
        if not kwargs.get("prompt_tuning_init_text"):
            raise InputError("--prompt_tuning_init TEXT needs --prompt_tuning_init_text")
        kwargs["tokenizer_name_or_path"] = model_path
    try:
        return spec.config_cls(task_type=task_type, **kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(f"invalid options for method {method!r}: {err}") from err

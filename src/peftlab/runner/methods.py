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
from peftlab.methods.unipelt.model import ENCODER_ATTR
from peftlab.methods.xprompt import XPromptConfig
from peftlab.methods.xprompt.pruning import count_to_prune
from peftlab.runner.errors import InputError
from peftlab.runner.models import DECODER, ENCODER, ENCODER_DECODER, FAMILIES


@dataclass(frozen=True)
class Recipe:
    """A method's training recipe: the `TrainingArguments` values its paper (or official code) trains with.

    A run takes them unless the user set the same argument (flag, config file or sweep file): see
    `args.apply_recipe`. `source` says where each number comes from and what is unverified (README table).
    """

    learning_rate: float
    optim: str = "adamw_torch"
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    warmup_steps: float = 0  # transformers: a count, or a fraction of the run when < 1
    max_grad_norm: float = 1.0  # 0: no clipping
    source: str = ""

    def training_values(self) -> dict[str, Any]:
        """The recipe as `TrainingArguments` field values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}


# T5 prompt recipe of Residual Prompt Tuning's official code (prompt_tuner2.py); Lester et al. use Adafactor
_RPT_T5 = Recipe(
    0.3,
    lr_scheduler_type="constant",
    weight_decay=1e-5,
    max_grad_norm=0.0,
    source="RPT official code (arazd/ResidualPrompts prompt_tuner2.py): AdamW, constant lr 0.3, wd 1e-5, no clipping",
)
# the same authors' BERT code (arazd/ProgressivePrompts BERT_codebase README): prompts on BERT need a small rate
_PROMPT_BERT = Recipe(
    3e-5,
    lr_scheduler_type="constant_with_warmup",
    weight_decay=0.01,
    warmup_steps=1000,
    source="RPT authors' BERT code (ProgressivePrompts BERT_codebase): AdamW lr 3e-5, wd 0.01, constant after "
    "1,000 warmup steps (50 epochs); clipping not stated there (Trainer default 1.0 kept)",
)
_UNIPELT = Recipe(
    5e-4,
    source="UniPELT paper setup: lr 5e-4 (unverified, secondary notes); the official code is HF run_glue, whose "
    "defaults (linear decay, wd 0, clipping 1.0) are kept",
)
_UNIPELT_MLP = (f".{ENCODER_ATTR}.",)  # the prefix MLP: saved for exact resume, next to the folded keys/values


@dataclass(frozen=True)
class XPromptSearch:
    """XPrompt's pruning search, run by the runner (not part of the adapter config): every (token, piece) ratio
    pair of the grid is tried from the stage-1 prompt for `xprompt_rounds` rounds of score -> prune -> rewind ->
    retrain on the survivors, and the pair with the best dev score is kept."""

    xprompt_token_ratios: list[float] = field(
        default_factory=lambda: [0.25, 0.5],
        metadata={"help": "Token pruning ratios tried (each in (0, 1); the paper searches 0.1-0.9)."},
    )
    xprompt_piece_ratios: list[float] = field(
        default_factory=lambda: [0.25],
        metadata={"help": "Piece pruning ratios tried within surviving tokens (each in (0, 1))."},
    )
    xprompt_rounds: int = field(
        default=1,
        metadata={"help": "Pruning rounds per ratio pair (>= 1; the paper prunes iteratively)."},
    )

    def pairs(self) -> list[tuple[float, float]]:
        return [(t, p) for t in self.xprompt_token_ratios for p in self.xprompt_piece_ratios]

    def check(self, options: Mapping[str, Any]) -> None:
        """Refuse, before anything loads, a grid that XPrompt cannot run (options: the method's option values,
        with the prompt length `num_virtual_tokens`)."""
        num_tokens = options["num_virtual_tokens"]
        for name in ("xprompt_token_ratios", "xprompt_piece_ratios"):
            ratios = getattr(self, name)
            if not ratios:
                raise InputError(f"--{name} is empty; allowed: one or more ratios in (0, 1)")
            bad = [r for r in ratios if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r < 1]
            if bad:
                raise InputError(f"--{name} {bad[0]!r} is not allowed; allowed: ratios in (0, 1)")
        rounds = self.xprompt_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise InputError(f"--xprompt_rounds {rounds!r} is not allowed; allowed: a whole number >= 1")
        for ratio in self.xprompt_token_ratios:
            remaining = num_tokens
            for _ in range(rounds):
                remaining -= count_to_prune(ratio, remaining)
            if remaining < 1:
                raise InputError(
                    f"--xprompt_token_ratios {ratio} with --xprompt_rounds {rounds} prunes all {num_tokens} prompt "
                    "tokens; allowed: a smaller ratio or fewer rounds (at least one token must survive)"
                )


_UNIPELT_OPTIONS = (
    "components",
    "adapter_placement",
    "use_gates",
    "gate_ignores_padding",
    "lora_r",
    "prefix_length",
    "prefix_hidden_size",
    "adapter_reduction_factor",
)


def _xprompt_train(trainer: Any, resume_from_checkpoint: str | None, search: XPromptSearch) -> Any:
    """XPrompt's whole pipeline with the run's Trainer: stage 1, then per ratio pair `search.xprompt_rounds` rounds
    of score -> prune -> rewind -> retrain with the same schedule and a fresh optimizer; the best pair on dev wins."""
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
        evaluate=lambda model: _dev_score_after_training(trainer),
        score_data=trainer.get_train_dataloader(),
        ratio_pairs=search.pairs(),
        num_rounds=search.xprompt_rounds,
    )
    return outputs[-1]


def _dev_score_after_training(trainer: Any) -> float:
    """The dev score of the model as `trainer.train()` left it. When the Trainer evaluated at its last step and
    kept that state (no best-checkpoint reload), that evaluation is the answer: evaluating again would repeat a
    whole dev pass after every XPrompt stage for the same number."""
    state = trainer.state
    last = next((entry for entry in reversed(state.log_history) if "eval_score" in entry), None)
    if last is not None and last["step"] == state.global_step and not trainer.args.load_best_model_at_end:
        return last["eval_score"]
    return trainer.evaluate()["eval_score"]


_NO_PAPER = "peftlab default: no paper recipe audited (Trainer defaults: AdamW, linear decay, wd 0, clipping 1.0)"
NO_PAPER_RECIPE = Recipe(5e-4, source=_NO_PAPER)


@dataclass(frozen=True)
class MethodSpec:
    """How the runner builds one method.

    config_cls: the PEFT config class (None: full fine-tuning, every weight trained, no adapter).
    options: config fields exposed as `--flags`.
    defaults: runner defaults that differ from the config class's own (e.g. a prompt length).
    families: model families the method works on.
    recipe: the training recipe (optimizer, learning rate, schedule, weight decay, warmup, clipping) of its paper.
    family_recipes: recipes for the model families whose papers train differently (e.g. prompts on BERT).
    train: for a method whose training is more than one `Trainer.train` call (e.g. XPrompt: train, score, prune,
        rewind, retrain): `train(trainer, resume_from_checkpoint, train_options)` runs it and returns the final
        `TrainOutput`.
    train_options: a dataclass of options of `train` (not of the adapter config); its fields are `--flags` too.
    default_targets: the method's default `target_modules` by model_type (peft's mapping), so that a model type
        without defaults is refused before loading; None when the method picks its modules itself.
    trains: False for the zero-shot baseline: the pretrained model is evaluated as it is (no step, nothing saved).
    training_only_keys: substrings of saved-adapter keys kept only to resume training (UniPELT's prefix MLP, whose
        folded keys/values are saved too): not counted as stored, since an inference adapter does not need them.
    """

    config_cls: type[PeftConfig] | None
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES
    recipe: Recipe = NO_PAPER_RECIPE
    family_recipes: Mapping[str, Recipe] = field(default_factory=dict)
    train: Callable[[Any, str | None, Any], Any] | None = None
    train_options: type | None = None
    default_targets: Mapping[str, Any] | None = None
    trains: bool = True
    training_only_keys: tuple[str, ...] = ()

    @property
    def prompt_learning(self) -> bool:
        """Soft-prompt methods: their prompt length (`num_virtual_tokens`) must be at least 1."""
        return self.config_cls is not None and issubclass(self.config_cls, PromptLearningConfig)

    def recipe_for(self, family: str) -> Recipe:
        return self.family_recipes.get(family, self.recipe)

    @property
    def train_option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.train_options)) if self.train_options else ()

    @property
    def all_options(self) -> tuple[str, ...]:
        """Every `--flag` of the method: config fields, then options of its own training procedure."""
        return (*self.options, *self.train_option_names)


_PROMPT_OPTIONS = ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text")

METHODS: dict[str, MethodSpec] = {
    # the pretrained model scored as it is (a causal LM through the task's verbalizer): what every method must beat
    "zero_shot": MethodSpec(None, trains=False, recipe=Recipe(0.0, source="no training")),
    "full": MethodSpec(  # full fine-tuning, the baseline
        None,
        recipe=Recipe(
            2e-5,
            source="UniPELT's full fine-tuning baseline: lr 2e-5 (unverified; BitFit's paper: 1e-5 on BERT-large); "
            "HF run_glue defaults otherwise",
        ),
    ),
    "prompt_tuning": MethodSpec(
        PromptTuningConfig,
        _PROMPT_OPTIONS,
        # prompt rows start as sampled vocabulary embeddings (Lester et al.), not peft's random default
        {"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"},
        family_recipes={ENCODER: _PROMPT_BERT},
        recipe=dataclasses.replace(
            _RPT_T5,
            source="RPT official code's prompt-tuning baseline (same recipe as RPT); Lester et al. use Adafactor "
            "lr 0.3, wd 1e-5",
        ),
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
        recipe=Recipe(1e-2, source=_NO_PAPER),
    ),
    # BERT-style encoders reject past key values in transformers 5 ("Model does not support past key values")
    "prefix_tuning": MethodSpec(
        PrefixTuningConfig,
        ("num_virtual_tokens", "encoder_hidden_size", "prefix_projection"),
        {"num_virtual_tokens": 20},
        families=(ENCODER_DECODER, DECODER),
        recipe=Recipe(1e-2, source=_NO_PAPER),
    ),
    "lora": MethodSpec(
        LoraConfig,
        ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"),
        {"lora_alpha": 16},
        default_targets=TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        recipe=Recipe(
            5e-4,
            weight_decay=0.1,
            warmup_steps=0.06,
            source="LoRA paper (Hu et al.) RoBERTa-base GLUE: AdamW, linear decay, warmup ratio 0.06, lr 4e-4-5e-4 "
            "by task; wd 0.1 from the official NLU scripts (unverified); UniPELT's LoRA baseline: 5e-4 (unverified)",
        ),
    ),
    "ia3": MethodSpec(
        IA3Config,
        ("target_modules", "feedforward_modules"),
        default_targets=TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
        recipe=Recipe(3e-3, source=_NO_PAPER),
    ),
    "beft": MethodSpec(
        BeftConfig,
        ("target_modules",),
        default_targets=TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING,
        recipe=Recipe(1e-3, source=f"BitFit's learning rate; {_NO_PAPER}"),
    ),
    # peftlab's methods
    "bitfit": MethodSpec(
        BitFitConfig,
        ("bias_terms", "add_missing_biases"),
        recipe=Recipe(
            1e-3,
            lr_scheduler_type="constant",
            source="BitFit official code (benzakenelad/BitFit glue_evaluator.py, run_glue.py): AdamW lr 1e-3, no "
            "weight decay, constant lr (no scheduler), clipping 1.0; batch 8, 16 epochs",
        ),
    ),
    "residual_prompt_tuning": MethodSpec(
        ResidualPromptTuningConfig,
        (
            *_PROMPT_OPTIONS,
            "encoder_bottleneck_size",
            "encoder_layer_norm",
            "encoder_dropout",
            "encoder_nonlinearity",
            "encoder_separate",
            "encoder_residual",
        ),
        family_recipes={ENCODER: _PROMPT_BERT},
        recipe=_RPT_T5,
    ),
    "unipelt": MethodSpec(UniPELTConfig, _UNIPELT_OPTIONS, recipe=_UNIPELT, training_only_keys=_UNIPELT_MLP),
    "unipelt_ap": MethodSpec(
        UniPELTConfig,
        _UNIPELT_OPTIONS,
        {"components": ("adapter", "prefix")},
        recipe=_UNIPELT,
        training_only_keys=_UNIPELT_MLP,
    ),
    # prompt tuning, then XPromptSearch's ratio grid, the best pair chosen on dev
    "xprompt": MethodSpec(
        XPromptConfig,
        (*_PROMPT_OPTIONS, "num_pieces"),
        {"num_virtual_tokens": 20},
        train=_xprompt_train,
        train_options=XPromptSearch,
        recipe=Recipe(
            0.3,
            optim="adafactor",
            lr_scheduler_type="constant",
            weight_decay=1e-5,
            source="XPrompt paper (T5 only; no official code): Adafactor lr 0.3, wd 1e-5; schedule not stated "
            "(constant, as Lester et al.); clipping not stated (1.0 kept); used on every family",
        ),
    ),
}


def recipe_table() -> str:
    """The README's table of every method's recipe (a test keeps the README equal to it)."""
    lines = [
        "| method | family | optimizer | lr | schedule | weight decay | warmup | clipping | source |",
        "|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for method, spec in METHODS.items():
        if not spec.trains:
            continue
        rows = [("all" if not spec.family_recipes else "others", spec.recipe)]
        rows += [(family, recipe) for family, recipe in spec.family_recipes.items()]
        for family, r in rows:
            warmup = f"{r.warmup_steps:g} of the run" if 0 < r.warmup_steps < 1 else f"{r.warmup_steps:g} steps"
            clipping = f"{r.max_grad_norm:g}" if r.max_grad_norm > 0 else "none"
            lines.append(
                f"| {method} | {family} | {r.optim} | {r.learning_rate:g} | {r.lr_scheduler_type} | "
                f"{r.weight_decay:g} | {warmup} | {clipping} | {r.source} |"
            )
    return "\n".join(lines)


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
    if origin is list and typing.get_args(hint) in ((str,), (float,)):
        return OptionType(typing.get_args(hint)[0], is_list=True)
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


def _declaring_class(spec: MethodSpec, name: str) -> type:
    """The dataclass whose field option `name` is: the PEFT config, or the method's training options."""
    return spec.train_options if name in spec.train_option_names else spec.config_cls


def method_options() -> dict[str, tuple[OptionType, str]]:
    """Every method option of the map: name -> (flag type, help). One name has one type across methods."""
    options: dict[str, tuple[OptionType, str]] = {}
    owners: dict[str, str] = {}
    for method, spec in METHODS.items():
        fields = _config_fields(spec.config_cls) if spec.config_cls else {}
        if spec.train_options is not None:
            fields.update(_config_fields(spec.train_options))
        for name in spec.all_options:
            if name not in fields:
                raise TypeError(f"method {method!r} exposes {name!r}, which {spec.config_cls.__name__} lacks")
            option_type = _flag_type(_option_type(_declaring_class(spec, name), name))
            if name in options and options[name][0] != option_type:
                if {options[name][0].base, option_type.base} != {int, float}:
                    raise TypeError(f"option {name!r} has different types in methods {owners[name]!r} and {method!r}")
                option_type = OptionType(float)  # e.g. lora_alpha: int for LoRA, float elsewhere
            help_text = fields[name].metadata.get("help", "").replace("%", "%%")  # argparse formats help
            owners.setdefault(name, method)
            users = [m for m, s in METHODS.items() if name in s.all_options]
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
    stray = sorted(name for name, value in given.items() if value is not None and name not in spec.all_options)
    if stray:
        own = ", ".join(f"--{o}" for o in spec.all_options) or "none"
        raise InputError(f"--{stray[0]} is not an option of method {method!r} (its options: {own})")
    values = dict(spec.defaults)
    if spec.train_options is not None:
        values.update(dataclasses.asdict(spec.train_options()))  # recorded in results.json with the run
    values.update(
        {
            name: _option_type(_declaring_class(spec, name), name).convert(name, value)
            for name, value in given.items()
            if value is not None and name in spec.all_options
        }
    )
    length = values.get("num_virtual_tokens")
    if spec.prompt_learning and length is not None and length < 1:
        raise InputError(
            f"--num_virtual_tokens {length} is not allowed for method {method!r}; allowed: a prompt length >= 1"
        )
    train_options(method, values)
    return values


def train_options(method: str, options: Mapping[str, Any]) -> Any:
    """The method's training options (e.g. `XPromptSearch`) from its option values, checked; None if it has none."""
    spec = get_method(method)
    if spec.train_options is None:
        return None
    chosen = spec.train_options(**{name: options[name] for name in spec.train_option_names if name in options})
    chosen.check(options)
    return chosen


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
    kwargs = {name: value for name, value in options.items() if name not in spec.train_option_names}
    if kwargs.get("prompt_tuning_init") == "TEXT":
        if not kwargs.get("prompt_tuning_init_text"):
            raise InputError("--prompt_tuning_init TEXT needs --prompt_tuning_init_text")
        kwargs["tokenizer_name_or_path"] = model_path
    try:
        return spec.config_cls(task_type=task_type, **kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(f"invalid options for method {method!r}: {err}") from err

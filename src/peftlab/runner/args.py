"""Arguments of `peftlab train`: model, data, PEFT and training dataclasses parsed with `HfArgumentParser`.

They come from flags, or from a YAML/JSON file given first (`peftlab train run.yaml --learning_rate 1e-3`), flags
overriding the file, or from a sweep run's mapping of values (`train_arguments`: no flags written and read back).
The PEFT dataclass is generated from the method map, so each method option is a flag. Values that parse but cannot
train (a negative learning rate, a batch size of 0, an output dir that is a file, ...) are refused here.

Training recipes: each method's paper recipe (optimizer, learning rate, schedule, weight decay, warmup, clipping;
`methods.Recipe`) fills every recipe argument the user did not set. "Set" means named as a flag, in the config file
or in the sweep run's values, even when the value equals transformers' default; `apply_recipe` applies it once the
model family is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from peftlab.runner.errors import InputError
from peftlab.runner.methods import METHODS, check_method_flags, method_key, method_options


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local model folder (offline) or Hub id; `minilm` is the packaged all-MiniLM-L6-v2, "
            "`smollm2` the SmolLM2 checkpoint written by `peftlab convert-gguf`."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder if not the model's."})
    train_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules a PEFT method trains in full with the task head, e.g. `pooler` (a sentence-embedding "
            "checkpoint's pooler was never trained for classification). Layers the checkpoint lacks are added anyway."
        },
    )


@dataclass
class DataArguments:
    task_name: str | None = field(
        default=None,
        metadata={
            "help": "GLUE, SuperGLUE or offline task (movie_reviews, sms_spam, trec); with --train_file, "
            "the name of the local task."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "glue, super_glue or offline; needed only when a task name is in several."},
    )
    train_file: str | None = field(default=None, metadata={"help": "Local CSV/TSV/JSON/JSONL training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local dev file."})
    test_file: str | None = field(default=None, metadata={"help": "Local labelled test file."})
    text_column: list[str] | None = field(
        default=None,
        metadata={
            "help": "One or two text columns of the local files (default, as run_glue.py: sentence1 and "
            "sentence2 if present, else the first one or two text columns besides the label)."
        },
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column of the local files (default: label, else labels)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Maximum input length in tokens."})
    k_shot: int | None = field(
        default=None, metadata={"help": "Train on K examples per label (stratified, sampled with --seed)."}
    )
    dev_size: float | None = field(
        default=None,
        metadata={
            "help": "Dev examples held out of train when a task has no labelled dev split (fraction < 1 or "
            "count); default: 10%% of train, at most 1,000."
        },
    )
    test_size: float = field(
        default=0.2,
        metadata={"help": "Test examples held out of train when a task has no labelled test split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a fixed random subset of train."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use fixed random subsets of dev/test."})
    verbalizer: list[str] | None = field(
        default=None, metadata={"help": "One word per label for text-to-text and decoder-only models."}
    )


@dataclass
class RunnerTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the runner's defaults and its few additions."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output dir that holds a finished or started run."},
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without dev improvement."}
    )
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Logging integrations."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on dev: no, steps, epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps, epoch, best."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best one too)."})
    metric_for_best_model: str | None = field(
        default="score",
        metadata={"help": "Dev metric for the best checkpoint (`score`: mean of task metrics)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the encoded datasets hold model inputs only (+ class_labels)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to on CPU (avoids a warning per dataloader)


def _peft_arguments_class() -> type:
    """A dataclass with `--peft_type` and every method option of the map (None: not given)."""
    fields: list[tuple[str, Any, Any]] = [
        ("peft_type", str, field(default="lora", metadata={"help": f"Method: {', '.join(METHODS)}."})),
    ]
    for name, (option_type, help_text) in method_options().items():
        metadata: dict[str, Any] = {"help": help_text}
        if option_type.is_list:
            annotation = list[option_type.base] | None
        else:
            annotation = option_type.base | None
        if option_type.choices:
            metadata["choices"] = list(option_type.choices)
        if option_type.base is bool:
            metadata.update(nargs="?", const=True)
        fields.append((name, annotation, field(default=None, metadata=metadata)))
    return dataclasses.make_dataclass("PeftArguments", fields)


PeftArguments = _peft_arguments_class()
ARGUMENT_CLASSES = (ModelArguments, DataArguments, PeftArguments, RunnerTrainingArguments)
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _parser() -> HfArgumentParser:
    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="peftlab train")

    def error(message: str) -> None:  # argparse would print usage and exit; we want one line and exit code 2
        raise InputError(message)

    parser.error = error
    return parser


def _known_flags(parser: HfArgumentParser) -> dict[str, Any]:
    return {opt: action for action in parser._actions for opt in action.option_strings}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of argument names to values from a YAML or JSON file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise InputError(f"config file {path} must hold a mapping of argument names to values")
    return values


def _unknown(flag: str, known: dict[str, Any], where: str) -> InputError:
    close = difflib.get_close_matches(flag, list(known), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return InputError(f"unknown {where} {flag}{hint} (see `peftlab train --help` for the allowed flags)")


def _cpu_data_parallel_if_launched() -> None:
    """torchrun/accelerate on a machine without GPUs: ask accelerate for CPU data parallelism (gloo).

    Upstream gap: accelerate picks MULTI_CPU only when told the run is on CPU; otherwise every rank silently
    trains alone (parallel_mode NOT_PARALLEL, each rank believing it is process 0).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


@dataclass(frozen=True)
class RunArguments:
    """One run's parsed arguments, with its method's name in the map and its option values (defaults filled in).

    explicit: the argument names the user set (flags, config file, sweep values): the recipe never overrides them.
    recipe: the recipe arguments taken from the method's recipe (empty until `apply_recipe`).
    """

    model: ModelArguments
    data: DataArguments
    peft: Any  # PeftArguments
    training: RunnerTrainingArguments
    method: str
    method_options: dict[str, Any]
    explicit: frozenset[str] = frozenset()
    recipe: dict[str, Any] = field(default_factory=dict)


def parse_train_args(argv: list[str]) -> RunArguments:
    """`peftlab train` arguments: an optional YAML/JSON file first, then flags that override it."""
    tokens = list(argv)
    if tokens and not tokens[0].startswith("-") and tokens[0].endswith(CONFIG_SUFFIXES):
        return train_arguments(read_config_file(tokens[0]), tokens[1:], where=f"key in {tokens[0]}:")
    return train_arguments({}, tokens)


def train_arguments(values: dict[str, Any], flags: Sequence[str] = (), where: str = "argument") -> RunArguments:
    """Arguments from a mapping of names to values (a config file, a sweep run), then command-line flags.

    The values become the parser's defaults, so they are converted like flags (YAML reads `1e-3` as a string) and
    checked like them, without being written out as flags and read back. Bad input -> InputError.
    """
    _cpu_data_parallel_if_launched()
    parser = _parser()
    known = _known_flags(parser)
    defaults = {}
    for name, value in values.items():
        action = known.get(f"--{name}")
        if action is None:
            raise _unknown(f"--{name}", known, where)
        defaults[action.dest] = [value] if action.nargs in ("+", "*") and not isinstance(value, list) else value
    parser.set_defaults(**defaults)
    explicit = set(defaults)
    for token in flags:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            if flag not in known:
                raise _unknown(flag, known, "flag")
            explicit.add(known[flag].dest)
    try:
        model_args, data_args, peft_args, training_args = parser.parse_args_into_dataclasses(
            args=list(flags), return_remaining_strings=False
        )
    except InputError:
        raise
    except ValueError as err:  # TrainingArguments.__post_init__ checks (strategies, precision, ...)
        raise InputError(str(err).strip().splitlines()[0]) from err
    except ImportError as err:  # an option whose package is missing, e.g. --deepspeed without deepspeed
        raise InputError(
            f"a missing package is needed for these arguments: {str(err).strip().splitlines()[0]}"
        ) from err
    method = method_key(peft_args.peft_type)
    options = check_method_flags(method, method_option_values(peft_args))
    if not model_args.model_name_or_path:
        raise InputError("--model_name_or_path is required (a model folder, or `minilm`)")
    if not training_args.output_dir:
        raise InputError("--output_dir is required")
    _check_values(data_args, training_args)
    return RunArguments(model_args, data_args, peft_args, training_args, method, options, frozenset(explicit))


def apply_recipe(args: RunArguments, family: str) -> RunArguments:
    """The run with its method's recipe for this model family in every recipe argument the user did not set."""
    recipe = METHODS[args.method].recipe_for(family)
    taken = {name: value for name, value in recipe.training_values().items() if name not in args.explicit}
    if not taken:
        return args
    training = dataclasses.replace(args.training, **taken)
    return dataclasses.replace(args, training=training, recipe=taken)


# (flag, allowed, predicate on the value): values that argparse accepts and training would fail on much later
_POSITIVE_INT = ("a whole number >= 1", lambda v: v is None or v >= 1)
_VALUE_RULES = (
    ("learning_rate", "a number >= 0", lambda v: v >= 0),
    ("per_device_train_batch_size", *_POSITIVE_INT),
    ("per_device_eval_batch_size", *_POSITIVE_INT),
    ("gradient_accumulation_steps", *_POSITIVE_INT),
    ("max_steps", "-1 (train for --num_train_epochs) or a whole number >= 1", lambda v: v == -1 or v >= 1),
    ("warmup_steps", "a number >= 0", lambda v: v >= 0),
    ("weight_decay", "a number >= 0", lambda v: v >= 0),
    ("logging_steps", "a number > 0", lambda v: v > 0),
    ("eval_steps", "a number > 0", lambda v: v is None or v > 0),
    ("save_steps", "a number > 0", lambda v: v > 0),
    ("early_stopping_patience", *_POSITIVE_INT),
    ("max_seq_length", *_POSITIVE_INT),
    ("max_train_samples", *_POSITIVE_INT),
    ("max_eval_samples", *_POSITIVE_INT),
    ("k_shot", "a whole number of examples per label >= 1", lambda v: v is None or v >= 1),
    ("dev_size", "a fraction in (0, 1) or a count >= 1", lambda v: v is None or v > 0),
    ("test_size", "a fraction in (0, 1) or a count >= 1", lambda v: v > 0),
)


def _check_values(data_args: DataArguments, training_args: RunnerTrainingArguments) -> None:
    """Refuse, with one line, the values that would otherwise fail after the model has loaded."""
    for name, allowed, ok in _VALUE_RULES:
        value = getattr(data_args if hasattr(data_args, name) else training_args, name)
        if not ok(value):
            raise InputError(f"--{name} {value} is not allowed; allowed: {allowed}")
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise InputError(
            f"--num_train_epochs {training_args.num_train_epochs} trains nothing; allowed: a number > 0 "
            "(or --max_steps >= 1)"
        )
    out = Path(training_args.output_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"--output_dir {out}: {blocking} is a file, not a folder")


def method_option_values(peft_args: Any) -> dict[str, Any]:
    """The method options of a parsed PeftArguments (None: not given)."""
    return {name: getattr(peft_args, name) for name in method_options()}


# TrainingArguments fields recorded in results.json (the others are defaults or machine details)
RECORDED_TRAINING_FIELDS = (
    "learning_rate",
    "seed",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_steps",
    "lr_scheduler_type",
    "optim",
    "max_grad_norm",
    "eval_strategy",
    "load_best_model_at_end",
    "early_stopping_patience",
    "bf16",
    "fp16",
)


def hyperparameters(model_args: Any, data_args: Any, peft_args: Any, training_args: Any) -> dict[str, Any]:
    """The run's settings for results.json: what differs from the defaults, and the main training settings."""
    out: dict[str, Any] = {"peft_type": peft_args.peft_type}
    for obj in (model_args, data_args, peft_args):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value != f.default:
                out[f.name] = value
    for name in RECORDED_TRAINING_FIELDS:
        value = getattr(training_args, name)
        out[name] = value if isinstance(value, int | float | bool | type(None)) else str(value)
    return out

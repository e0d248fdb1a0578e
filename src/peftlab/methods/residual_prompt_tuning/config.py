"""Configuration of Residual Prompt Tuning (Razdaibiedina et al., ACL Findings 2023).

The config subclasses stock `PromptTuningConfig`, so the prompt initialisation fields (`prompt_tuning_init`,
`prompt_tuning_init_text`, `tokenizer_name_or_path`, `tokenizer_kwargs`) and their meaning are PEFT's own, and a
saved adapter differs from a stock prompt-tuning one only by its `peft_type` and the `encoder_*` fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PromptTuningConfig, PromptTuningInit
from peft.utils import PeftType, TaskType

from peftlab.integration import (
    PeftlabConfigMixin,
    check_encoder_only_prompt,
    check_prompt_values_set,
    warn_if_task_type_unset,
)

PEFT_TYPE_NAME = "RESIDUAL_PROMPT_TUNING"
NONLINEARITIES = ("relu", "tanh", "sigmoid")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class ResidualPromptTuningConfig(PromptTuningConfig, PeftlabConfigMixin):
    """Soft prompt P (n x d) reparameterized token by token as P' = LN(W_up act(W_down P)) + P.

    Defaults follow the official code (arazd/ResidualPrompts, `train.py`): prompt length 10, bottleneck 800,
    dropout 0, ReLU, one MLP shared by all prompt tokens, skip connection on, prompt initialised from rows of the
    word-embedding matrix sampled over the whole vocabulary. The official module order is
    Linear -> act -> Linear -> Dropout -> LayerNorm, then the skip connection; it is kept here. The LayerNorm is
    per family, as in the authors' two code bases: on for encoder-decoder models (T5, arazd/ResidualPrompts), off
    otherwise (their BERT code, arazd/ProgressivePrompts `ResMLP`, has none: a LayerNorm output of norm sqrt(d)
    would bury BERT-scale word embeddings of norm ~1 under the MLP branch).

    Args:
        encoder_bottleneck_size: width m of the MLP bottleneck (official default 800; the paper's notebook uses 500).
        encoder_layer_norm: apply LayerNorm to the MLP output before the skip connection; None (default) chooses
            per family, see `resolved_layer_norm`.
        encoder_dropout: dropout on the MLP output (before the LayerNorm), in [0, 1).
        encoder_nonlinearity: "relu" (paper), "tanh" or "sigmoid" (official code's "sigm").
        encoder_separate: False = one MLP shared by all prompt tokens (paper); True = one MLP per prompt token, token
            i of the prompt going through MLP i only.
        encoder_residual: keep the skip connection (False gives the paper's "MLP reparameterization without skip
            connection" ablation).
        prompt_tuning_init: SAMPLE_VOCAB (default, as the official code), TEXT (needs `prompt_tuning_init_text` and
            `tokenizer_name_or_path`), or RANDOM (uniform in [-0.5, 0.5], as the official code's random init;
            stock prompt tuning's RANDOM keeps `nn.Embedding`'s N(0, 1) instead).
        num_transformer_submodules: 1 (or None, meaning 1): encoder-decoder models get the prompt on the encoder
            only, as in the paper. Decoder prompts are refused, see `__post_init__`.
    """

    num_virtual_tokens: int = field(default=10, metadata={"help": "Prompt length n (official default 10)"})
    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.SAMPLE_VOCAB,
        metadata={"help": "SAMPLE_VOCAB (official default), TEXT or RANDOM (uniform in [-0.5, 0.5])"},
    )
    encoder_bottleneck_size: int = field(default=800, metadata={"help": "MLP bottleneck width m"})
    encoder_layer_norm: bool | None = field(
        default=None,
        metadata={
            "help": "LayerNorm on the MLP output (default: on for seq2seq/T5 as the T5 code, off otherwise as "
            "the authors' BERT code)"
        },
    )
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout on the MLP output, in [0, 1)"})
    encoder_nonlinearity: str = field(default="relu", metadata={"help": f"One of {', '.join(NONLINEARITIES)}"})
    encoder_separate: bool = field(default=False, metadata={"help": "One MLP per prompt token instead of shared"})
    encoder_residual: bool = field(default=True, metadata={"help": "Skip connection around the MLP"})

    def __post_init__(self) -> None:
        self._validate()
        super().__post_init__()  # stock checks, and sets peft_type to PROMPT_TUNING
        self.peft_type = PeftType(PEFT_TYPE_NAME)
        warn_if_task_type_unset(self)

    def check_complete(self) -> None:
        """Called when the adapter is built: `task_type` and `num_virtual_tokens` may be None until then."""
        check_prompt_values_set(self)

    def _validate(self) -> None:
        """Reject bad values at config time, naming the field, the value and what is allowed.

        None (unset) passes for `task_type` and `num_virtual_tokens`, as in stock configs: see `check_complete`."""
        name = type(self).__name__
        if self.num_virtual_tokens is not None and not _positive_int(self.num_virtual_tokens):
            raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if not _positive_int(self.encoder_bottleneck_size):
            raise ValueError(
                f"{name}.encoder_bottleneck_size must be a positive integer, got {self.encoder_bottleneck_size!r}"
            )
        if self.encoder_layer_norm is not None and not isinstance(self.encoder_layer_norm, bool):
            raise ValueError(
                f"{name}.encoder_layer_norm must be True, False or None (per family), got {self.encoder_layer_norm!r}"
            )
        if self.encoder_nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"{name}.encoder_nonlinearity must be one of {', '.join(NONLINEARITIES)}, "
                f"got {self.encoder_nonlinearity!r}"
            )
        if not isinstance(self.encoder_dropout, int | float) or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"{name}.encoder_dropout must be a number in [0, 1), got {self.encoder_dropout!r}")
        inits = [init.value for init in PromptTuningInit]
        if self.prompt_tuning_init not in inits:
            raise ValueError(
                f"{name}.prompt_tuning_init must be one of {', '.join(inits)}, got {self.prompt_tuning_init!r}"
            )
        if self.prompt_tuning_init == PromptTuningInit.TEXT:
            if not self.tokenizer_name_or_path:
                raise ValueError(
                    f"{name}.tokenizer_name_or_path is required when prompt_tuning_init='TEXT' (a tokenizer name or "
                    f"local folder for AutoTokenizer), got {self.tokenizer_name_or_path!r}"
                )
            if not self.prompt_tuning_init_text:
                raise ValueError(
                    f"{name}.prompt_tuning_init_text is required when prompt_tuning_init='TEXT' (a non-empty string), "
                    f"got {self.prompt_tuning_init_text!r}"
                )
        tasks = [task.value for task in TaskType]
        if self.task_type is not None and self.task_type not in tasks:
            raise ValueError(f"{name}.task_type must be one of {', '.join(tasks)}, got {self.task_type!r}")
        check_encoder_only_prompt(self)


def resolved_layer_norm(config: ResidualPromptTuningConfig) -> bool:
    """Whether the MLP output gets a LayerNorm: the explicit setting, else on only for encoder-decoder (T5) tasks.

    T5's word embeddings have norms in the tens, like a LayerNorm output (sqrt(d)); BERT-style and LLaMA-style input
    embeddings have norms near 1, so the same LayerNorm makes the branch ~20x the prompt (all-MiniLM-L6-v2 at init:
    cos(P', P) 0.08, prompt rows pairwise cos 0.79), which the authors' BERT code avoids by having no LayerNorm.
    """
    if config.encoder_layer_norm is not None:
        return config.encoder_layer_norm
    return config.task_type == TaskType.SEQ_2_SEQ_LM

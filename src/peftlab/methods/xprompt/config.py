"""XPromptConfig: a prompt-tuning config that also records the pruned state of the prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PromptTuningConfig
from peft.tuners.prompt_tuning import PromptTuningInit
from peft.utils import PeftType

from peftlab.integration import (
    PeftlabConfigMixin,
    check_encoder_only_prompt,
    check_prompt_values_set,
    warn_if_task_type_unset,
)


@dataclass
class XPromptConfig(PromptTuningConfig, PeftlabConfigMixin):
    """Prompt tuning with hierarchical (token, then piece) pruning and rewinding (Ma et al., EMNLP 2022).

    `num_virtual_tokens` is the CURRENT prompt length: peft uses it for attention masks and slicing, so after pruning
    it equals the number of surviving tokens. `num_original_tokens` is the stage-1 length n0 (set automatically).
    Each token vector is split into `num_pieces` equal contiguous pieces for piece-level pruning; the token and
    piece masks themselves are saved with the adapter weights (see `XPromptEmbedding`).
    The default init samples rows of the vocabulary embeddings, as in the paper.
    """

    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.SAMPLE_VOCAB,
        metadata={"help": "How to initialise the prompt: SAMPLE_VOCAB (paper), RANDOM or TEXT"},
    )
    num_pieces: int = field(
        default=16, metadata={"help": "Pieces per prompt token vector; must divide the hidden size"}
    )
    num_original_tokens: int | None = field(
        default=None,
        metadata={"help": "Stage-1 prompt length before any pruning; defaults to num_virtual_tokens"},
    )

    def __post_init__(self) -> None:
        """Checks the values given; `task_type` and `num_virtual_tokens` may stay None until `check_complete`, as
        stock configs build with their defaults."""
        super().__post_init__()
        self.peft_type = PeftType("XPROMPT")
        if self.num_virtual_tokens is not None:
            self._check_lengths()
        if not isinstance(self.num_pieces, int) or self.num_pieces < 1:
            raise ValueError(f"num_pieces must be a positive integer, got {self.num_pieces!r}")
        if self.token_dim is not None:
            check_pieces_divide(self.num_pieces, self.token_dim)
        check_encoder_only_prompt(self)
        warn_if_task_type_unset(self)

    def check_complete(self) -> None:
        """Called when the adapter is built: the values that may be unset at construction must be there now."""
        check_prompt_values_set(self)
        self._check_lengths()

    def _check_lengths(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_original_tokens is None:
            self.num_original_tokens = self.num_virtual_tokens
        if not isinstance(self.num_original_tokens, int) or self.num_original_tokens < self.num_virtual_tokens:
            raise ValueError(
                f"num_original_tokens must be an integer >= num_virtual_tokens={self.num_virtual_tokens}, "
                f"got {self.num_original_tokens!r}"
            )


def check_pieces_divide(num_pieces: int, token_dim: int) -> None:
    if token_dim % num_pieces:
        raise ValueError(
            f"num_pieces={num_pieces} does not divide the hidden size token_dim={token_dim}; choose a divisor of "
            f"{token_dim}"
        )

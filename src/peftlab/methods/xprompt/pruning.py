"""Hierarchical structured pruning (tokens, then pieces of the surviving tokens) and rewinding to stage 1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft import PeftModel

from peftlab.methods.xprompt.common import sync_prompt_tokens, xprompt_parts
from peftlab.methods.xprompt.scoring import XPromptScores


@dataclass(frozen=True)
class XPromptSummary:
    num_original_tokens: int
    num_tokens: int  # surviving tokens (the current prompt length)
    num_pieces_kept: int  # surviving pieces of the surviving tokens
    num_pieces_total: int  # num_original_tokens * num_pieces
    fraction_kept: float  # surviving prompt parameters / stage-1 prompt parameters


def summary(model: PeftModel, adapter_name: str | None = None) -> XPromptSummary:
    """How much of the stage-1 prompt survives (works on trainable and on loaded inference-mode models)."""
    _, config, encoder = xprompt_parts(model, adapter_name)
    pieces_kept = int((encoder.piece_mask & encoder.token_mask[:, None]).sum())
    total = config.num_original_tokens * config.num_pieces
    return XPromptSummary(
        num_original_tokens=config.num_original_tokens,
        num_tokens=int(encoder.token_mask.sum()),
        num_pieces_kept=pieces_kept,
        num_pieces_total=total,
        fraction_kept=pieces_kept / total,
    )


def check_ratio(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def count_to_prune(ratio: float, remaining: int) -> int:
    """round(ratio * remaining), halves rounded up."""
    return math.floor(ratio * remaining + 0.5)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` lowest scores; ties go to the lower position (deterministic)."""
    order = torch.sort(scores, stable=True).indices
    return order[:count]


@torch.no_grad()
def prune(
    model: PeftModel,
    scores: XPromptScores,
    token_ratio: float,
    piece_ratio: float,
    *,
    adapter_name: str | None = None,
) -> XPromptSummary:
    """Remove the `token_ratio` lowest-scoring surviving tokens, then zero the `piece_ratio` lowest-scoring
    surviving pieces of the tokens that remain (both ratios of what survives now, rounded to nearest).

    The first call snapshots the current (stage-1 trained) prompt for `rewind`. Removed tokens leave the sequence:
    `config.num_virtual_tokens` and peft's virtual-token ids shrink to the surviving count.
    """
    adapter_name, config, encoder = xprompt_parts(model, adapter_name, trainable=True)
    check_ratio("token_ratio", token_ratio)
    check_ratio("piece_ratio", piece_ratio)
    token_mask = encoder.token_mask.cpu()
    piece_mask = encoder.piece_mask.cpu()
    if not (torch.equal(scores.token_mask, token_mask) and torch.equal(scores.piece_mask, piece_mask)):
        raise ValueError("the scores were computed under other masks than the model's current ones: recompute them")
    kept = torch.nonzero(token_mask).flatten()
    token_scores = scores.tokens[kept]
    if torch.isnan(token_scores).any():
        raise ValueError("the scores have NaN for surviving tokens")
    n_prune = count_to_prune(token_ratio, kept.numel())
    if n_prune >= kept.numel():
        raise ValueError(
            f"token_ratio={token_ratio} would prune every one of the {kept.numel()} remaining tokens; at least one "
            "token must survive"
        )
    new_token_mask = token_mask.clone()
    new_token_mask[kept[_lowest(token_scores, n_prune)]] = False
    new_piece_mask = piece_mask & new_token_mask[:, None]
    live = torch.nonzero(new_piece_mask)  # (m, 2): (token, piece) of every surviving piece
    piece_scores = scores.pieces[live[:, 0], live[:, 1]]
    if torch.isnan(piece_scores).any():
        raise ValueError("the scores have NaN for surviving pieces")
    p_prune = count_to_prune(piece_ratio, live.shape[0])
    if p_prune >= live.shape[0]:
        raise ValueError(
            f"piece_ratio={piece_ratio} would prune every one of the {live.shape[0]} remaining pieces of the "
            "surviving tokens; at least one piece must survive"
        )
    dropped = live[_lowest(piece_scores, p_prune)]
    new_piece_mask[dropped[:, 0], dropped[:, 1]] = False

    weight = encoder.embedding.weight
    if not bool(encoder.has_stage1):
        encoder.stage1_prompt.copy_(weight.detach())
        encoder.has_stage1.fill_(True)
    encoder.token_mask.copy_(new_token_mask)
    encoder.piece_mask.copy_(new_piece_mask)
    weight.masked_fill_(~encoder.element_mask(), 0.0)  # the raw values of pruned entries become 0 as well
    encoder.refresh()
    config.num_virtual_tokens = encoder._num_kept
    sync_prompt_tokens(model, adapter_name)
    return summary(model, adapter_name)


@torch.no_grad()
def rewind(model: PeftModel, *, adapter_name: str | None = None) -> None:
    """Reset the surviving prompt entries to their stage-1 trained values (bit for bit); pruned ones stay 0.

    Retrain afterwards with a NEW optimizer (as a fresh Trainer does): the optimizer's moments belong to the
    values before the rewind.
    """
    _, _, encoder = xprompt_parts(model, adapter_name, trainable=True)
    if not bool(encoder.has_stage1):
        raise ValueError("nothing to rewind to: the stage-1 prompt is recorded by the first prune(); prune first")
    weight = encoder.embedding.weight
    keep = encoder.element_mask()
    stage1 = encoder.stage1_prompt.to(weight.dtype)
    weight.copy_(torch.where(keep, stage1, torch.zeros_like(stage1)))

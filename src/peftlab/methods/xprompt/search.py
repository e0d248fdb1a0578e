"""The whole XPrompt pipeline: stage-1 training, then per (token_ratio, piece_ratio) pair several rounds of
score -> prune -> rewind -> retrain, and selection of the pair on the dev set."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from peftlab.methods.xprompt.common import sync_prompt_tokens, xprompt_parts
from peftlab.methods.xprompt.pruning import (
    XPromptSummary,
    check_ratio,
    count_to_prune,
    prune,
    rewind,
    summary,
)
from peftlab.methods.xprompt.scoring import LossFn, XPromptScores, importance_scores


@dataclass(frozen=True)
class SearchTrial:
    token_ratio: float
    piece_ratio: float
    dev_metric: float
    summary: XPromptSummary


@dataclass(frozen=True)
class SearchResult:
    stage1_metric: float  # dev metric of the unpruned stage-1 prompt
    trials: list[SearchTrial]
    best: SearchTrial  # the pair whose state the model holds on return


def _capture(model: PeftModel, adapter_name: str) -> dict:
    """An in-memory copy of everything trainable: the XPrompt state and the other trainable parameters (the
    task head peft trains alongside the prompt)."""
    encoder = model.prompt_encoder[adapter_name]
    others = {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and not name.startswith("prompt_encoder.")
    }
    return {"prompt": encoder.adapter_state(), "others": others}


@torch.no_grad()
def _restore(model: PeftModel, adapter_name: str, state: dict, *, prompt: bool = True) -> None:
    if prompt:
        model.prompt_encoder[adapter_name]._load_adapter_state_dict(state["prompt"])
        sync_prompt_tokens(model, adapter_name)
    params = dict(model.named_parameters())
    for name, value in state["others"].items():
        params[name].copy_(value)


def _check_pairs(pairs: Sequence[tuple[float, float]], num_tokens: int, num_rounds: int) -> None:
    if not pairs:
        raise ValueError("ratio_pairs is empty: give at least one (token_ratio, piece_ratio) pair")
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"ratio_pairs entries must be (token_ratio, piece_ratio), got {pair!r}")
        check_ratio("token_ratio", pair[0])
        check_ratio("piece_ratio", pair[1])
        remaining = num_tokens
        for _ in range(num_rounds):
            remaining -= count_to_prune(pair[0], remaining)
            if remaining < 1:
                raise ValueError(
                    f"token_ratio={pair[0]} prunes every token within num_rounds={num_rounds} rounds of "
                    f"{num_tokens} tokens; at least one token must survive"
                )


def run(
    model: PeftModel,
    *,
    train: Callable[[PeftModel], object],
    evaluate: Callable[[PeftModel], float],
    score_data: Iterable[Mapping[str, torch.Tensor]],
    ratio_pairs: Sequence[tuple[float, float]],
    num_rounds: int = 1,
    normalize: bool = False,
    loss_fn: LossFn | None = None,
    max_score_batches: int | None = None,
    skip_stage1: bool = False,
    adapter_name: str | None = None,
) -> SearchResult:
    """Run XPrompt end to end on `model` and leave it holding the best pair's retrained, pruned prompt.

    `train(model)` trains in place with the fixed schedule and a fresh optimizer each call (e.g.
    `lambda m: Trainer(m, args, train_dataset=...).train()`); it is called for stage 1 (unless `skip_stage1`, when
    the prompt is already trained) and after every rewind. `evaluate(model)` returns the dev metric (higher is
    better). Every pair starts from the stage-1 state; each of its `num_rounds` rounds scores the prompt on
    `score_data`, prunes both ratios of what survives, rewinds the prompt AND the other trainable parameters (the
    task head) to stage 1, and retrains. The first round of every pair scores that same stage-1 state, so its
    scores are computed once and shared by the pairs (each pass is a forward and backward over all of `score_data`).
    """
    adapter_name, config, _ = xprompt_parts(model, adapter_name, trainable=True)
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"num_rounds must be a positive integer, got {num_rounds!r}")
    _check_pairs(ratio_pairs, config.num_virtual_tokens, num_rounds)
    if hasattr(score_data, "__len__") and len(score_data) == 0:
        raise ValueError("score_data is empty: importance needs at least one example")
    if not skip_stage1:
        train(model)
    stage1 = _capture(model, adapter_name)
    stage1_metric = float(evaluate(model))
    trials: list[SearchTrial] = []
    best: SearchTrial | None = None
    best_state: dict | None = None

    def score() -> XPromptScores:
        return importance_scores(
            model,
            score_data,
            adapter_name=adapter_name,
            loss_fn=loss_fn,
            normalize=normalize,
            max_batches=max_score_batches,
        )

    stage1_scores = score()  # the model holds the stage-1 state here, as every pair's first round does
    for token_ratio, piece_ratio in ratio_pairs:
        _restore(model, adapter_name, stage1)
        for round_index in range(num_rounds):
            scores = stage1_scores if round_index == 0 else score()
            prune(model, scores, token_ratio, piece_ratio, adapter_name=adapter_name)
            rewind(model, adapter_name=adapter_name)
            _restore(model, adapter_name, stage1, prompt=False)
            train(model)
        trial = SearchTrial(token_ratio, piece_ratio, float(evaluate(model)), summary(model, adapter_name))
        trials.append(trial)
        if best is None or trial.dev_metric > best.dev_metric:
            best, best_state = trial, _capture(model, adapter_name)
    _restore(model, adapter_name, best_state)
    return SearchResult(stage1_metric=stage1_metric, trials=trials, best=best)

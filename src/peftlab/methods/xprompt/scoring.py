"""Importance scores of prompt tokens and pieces: I = E_x |dL(x)/d gamma| at gamma = 1 (Michel et al., 2019).

peft computes the prompt once and repeats it to the batch, so each example has its own copy p_hat_b. During
scoring that repeated prompt is replaced by a detached leaf, and one `torch.autograd.grad` call gives every
example's gradient dL/dp_hat_b at once (no parameter's `.grad` is touched, no optimizer is involved). With the
token mask gamma scaling prompt row i, dL_b/dgamma_i = sum_d p_{i,d} dL_b/dp_hat_{b,i,d}; for piece j of token i
the sum runs over that piece's slice of d. The absolute value is taken per example, then averaged over examples.

L(x) is the model's own loss for the single example x (what the model returns when called on that example
alone). The model's loss on a batch is a weighted mean of those per-example losses, so the gradient of the batch
loss w.r.t. example b's prompt copy is w_b dL(x_b)/dp_hat_b, and is divided by w_b:
- SEQ_CLS (integer labels: mean over examples whose label is not -100; float labels: 1/B) and QUESTION_ANS: w_b = 1/B.
- TOKEN_CLS, CAUSAL_LM, SEQ_2_SEQ_LM: the loss is a mean over target tokens (labels != -100), so
  w_b = n_b / N with n_b the example's target tokens and N the batch's.
Examples with no target (w_b = 0) have no loss of their own and are left out of the average. Other task types
(FEATURE_EXTRACTION has no loss) need `loss_fn(outputs, batch)` returning the (B,) per-example losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from peft import PeftModel

from peftlab.methods.xprompt.common import xprompt_parts

LossFn = Callable[[object, Mapping[str, torch.Tensor]], torch.Tensor]
_EXAMPLE_MEAN = {"SEQ_CLS", "QUESTION_ANS"}
_TOKEN_MEAN = {"TOKEN_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM"}


@dataclass
class XPromptScores:
    """Scores indexed by ORIGINAL token position; NaN where a token or piece is already pruned (no candidate).

    `token_mask`/`piece_mask` record the masks the scores were computed under, so that `prune` can refuse stale
    scores.
    """

    tokens: torch.Tensor  # (n0,)
    pieces: torch.Tensor  # (n0, num_pieces)
    token_mask: torch.Tensor
    piece_mask: torch.Tensor
    num_examples: int
    normalized: bool


def _example_weights(task_type: str, batch: Mapping[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """w_b: the weight of example b's own loss in the model's batch loss (see the module docstring)."""
    labels = batch.get("labels")
    if task_type in _EXAMPLE_MEAN:
        if task_type == "QUESTION_ANS":
            length = batch["input_ids"].shape[1] if "input_ids" in batch else batch["inputs_embeds"].shape[1]
            for name in ("start_positions", "end_positions"):
                positions = batch.get(name)
                if positions is not None and ((positions < 0) | (positions >= length)).any():
                    raise ValueError(
                        f"{name} outside [0, {length}) are ignored by the QA loss, which makes a single example's "
                        "loss undefined; drop those examples from the scoring data"
                    )
        if labels is not None and not labels.is_floating_point() and labels.dim() == 1:
            counted = (labels != -100).double()
            total = counted.sum()
            return counted / total if total > 0 else counted
        return torch.full((batch_size,), 1.0 / batch_size, dtype=torch.float64)
    if labels is None:
        raise ValueError(f"scoring a {task_type} model needs 'labels' in every batch (or a loss_fn)")
    counted = (labels != -100).reshape(batch_size, -1).sum(1).double()
    total = counted.sum()
    return counted / total if total > 0 else counted


class _CapturedPrompt:
    """Replaces `model.get_prompt` for the duration of scoring by one that returns a fresh leaf tensor."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.leaves: list[torch.Tensor] = []

    def __enter__(self) -> _CapturedPrompt:
        stock = self.model.get_prompt
        self.had_own = "get_prompt" in self.model.__dict__
        self.previous = self.model.__dict__.get("get_prompt")

        def get_prompt(batch_size: int, *args, **kwargs) -> torch.Tensor:
            leaf = stock(batch_size, *args, **kwargs).detach().requires_grad_(True)
            self.leaves.append(leaf)
            return leaf

        self.model.__dict__["get_prompt"] = get_prompt
        return self

    def __exit__(self, *exc) -> None:
        if self.had_own:
            self.model.__dict__["get_prompt"] = self.previous
        else:
            del self.model.__dict__["get_prompt"]


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def importance_scores(
    model: PeftModel,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    adapter_name: str | None = None,
    loss_fn: LossFn | None = None,
    normalize: bool = False,
    train_mode: bool = False,
    max_batches: int | None = None,
) -> XPromptScores:
    """Token and piece importance of the surviving prompt, averaged over the examples of `dataloader`.

    Batches are dicts of model inputs and targets (what a Trainer's collator yields). Runs in eval mode (no
    dropout) unless `train_mode=True`, and restores every module's train/eval flag afterwards. `normalize=True`
    divides the token scores by their L2 norm and each token's piece scores by the L2 norm of that token's pieces
    (Michel et al. normalise per layer; a token's pieces play the role of a layer's heads).
    """
    adapter_name, config, encoder = xprompt_parts(model, adapter_name)
    task_type = str(getattr(config.task_type, "value", config.task_type))
    if loss_fn is None and task_type not in _EXAMPLE_MEAN | _TOKEN_MEAN:
        raise ValueError(
            f"task_type={task_type!r} has no per-example loss that scoring can use: pass loss_fn(outputs, batch) "
            "returning the (batch_size,) losses"
        )
    if hasattr(dataloader, "__len__") and len(dataloader) == 0:
        raise ValueError("the scoring dataloader is empty: importance needs at least one example")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    n_kept, k, d = encoder._num_kept, config.num_pieces, config.token_dim
    token_sum = torch.zeros(n_kept, dtype=torch.float64)
    piece_sum = torch.zeros(n_kept, k, dtype=torch.float64)
    num_examples = 0
    device = encoder.embedding.weight.device
    modes = [(module, module.training) for module in model.modules()]
    model.train(train_mode)
    try:
        with _CapturedPrompt(model) as captured, torch.enable_grad():
            for step, raw_batch in enumerate(dataloader):
                if max_batches is not None and step >= max_batches:
                    break
                batch = _to_device(raw_batch, device)
                captured.leaves.clear()
                outputs = model(**batch)
                if len(captured.leaves) != 1:
                    raise RuntimeError(f"expected one prompt per forward pass, got {len(captured.leaves)}")
                leaf = captured.leaves[0]
                batch_size = leaf.shape[0]
                if loss_fn is not None:
                    losses = loss_fn(outputs, batch)
                    if losses.shape != (batch_size,):
                        raise ValueError(
                            f"loss_fn must return per-example losses of shape ({batch_size},), got "
                            f"{tuple(losses.shape)}"
                        )
                    total = losses.sum()
                    weights = torch.ones(batch_size, dtype=torch.float64)
                else:
                    total = getattr(outputs, "loss", None)
                    if total is None:
                        raise ValueError("the model returned no loss for a batch: include the targets or pass loss_fn")
                    weights = _example_weights(task_type, batch, batch_size)
                (grad,) = torch.autograd.grad(total, leaf)
                valid = weights > 0
                if not valid.any():
                    continue
                # dL_b/dp_hat_b times p (= d/dgamma at gamma = 1), back to the single example's own loss
                contrib = grad.detach().double()[valid.to(grad.device)].cpu() * leaf.detach()[0].double().cpu()
                contrib = contrib / weights[valid][:, None, None]
                token_sum += contrib.sum(-1).abs().sum(0)
                piece_sum += contrib.view(-1, n_kept, k, d // k).sum(-1).abs().sum(0)
                num_examples += int(valid.sum())
    finally:
        for module, training in modes:
            module.training = training
    if num_examples == 0:
        raise ValueError("the scoring dataloader yielded no example with a loss: importance needs at least one")
    tokens = token_sum / num_examples
    pieces = piece_sum / num_examples
    kept_index = encoder.kept_index.cpu()
    live_pieces = encoder.piece_mask.cpu()[kept_index]
    if normalize:
        norm = tokens.norm()
        tokens = tokens / norm if norm > 0 else tokens
        row_norm = (pieces * live_pieces).norm(dim=1, keepdim=True)
        pieces = torch.where(row_norm > 0, pieces / row_norm.clamp_min(1e-300), pieces)
    n0 = config.num_original_tokens
    full_tokens = torch.full((n0,), float("nan"), dtype=torch.float64)
    full_tokens[kept_index] = tokens
    full_pieces = torch.full((n0, k), float("nan"), dtype=torch.float64)
    full_pieces[kept_index] = torch.where(live_pieces, pieces, torch.nan)
    return XPromptScores(
        tokens=full_tokens,
        pieces=full_pieces,
        token_mask=encoder.token_mask.cpu().clone(),
        piece_mask=encoder.piece_mask.cpu().clone(),
        num_examples=num_examples,
        normalized=normalize,
    )

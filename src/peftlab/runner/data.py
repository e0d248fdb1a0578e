"""Data: splits (held-out dev/test, k-shot sampling), tokenisation per model family, verbalizers, batching.

Model families read a task differently:
- encoder + classification head: the text (pair) -> `labels` = class index (or float target for regression);
- encoder-decoder (text-to-text): "<task> <prompt>" -> the label's verbalizer word as the decoder target;
- decoder-only: "<prompt> answer:" followed by " <word>"; only the word's tokens carry loss (-100 elsewhere).
The generative families are evaluated by verbalizer scoring (`score_classes`): each label word's log-likelihood
given the input, the highest being the prediction. Their eval rows carry `class_labels` instead of `labels`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit, train_test_split
from transformers.trainer_utils import unwrap_peft_model

from peftlab.runner.errors import InputError
from peftlab.runner.models import DECODER, ENCODER, ENCODER_DECODER
from peftlab.runner.tasks import Task

# Holdouts and subsets use a fixed seed, so that every method and run seed sees the same dev and test examples;
# only the k-shot sample follows the run's --seed (as in the k-shot papers).
SPLIT_SEED = 1234
DEFAULT_DEV_FRACTION, DEFAULT_DEV_MAX = 0.1, 1000
ANSWER_CUE = " answer:"


@dataclass
class Splits:
    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset


def _holdout(ds: datasets.Dataset, size: float, task: Task) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split off `size` examples (a fraction if < 1), stratified by label, whole questions for grouped tasks."""
    n = len(ds)
    count = int(round(size * n)) if size < 1 else int(size)
    if not 0 < count < n:
        raise InputError(f"cannot hold out {count} of {n} examples (--dev_size/--test_size {size})")
    indices = np.arange(n)
    if task.grouped:
        splitter = GroupShuffleSplit(n_splits=1, test_size=count / n, random_state=SPLIT_SEED)
        keep, held = next(splitter.split(indices, groups=ds["group"][:]))
    else:
        labels = None if task.regression else np.asarray(ds["label"][:])
        if labels is not None and np.bincount(labels).min(initial=n) < 2:
            labels = None
        if labels is not None and count < len(np.unique(labels)):
            labels = None
        keep, held = train_test_split(indices, test_size=count, random_state=SPLIT_SEED, stratify=labels)
    return ds.select(np.sort(keep)), ds.select(np.sort(held))


def _subset(ds: datasets.Dataset, n: int | None) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    rng = np.random.default_rng(SPLIT_SEED)
    return ds.select(np.sort(rng.choice(len(ds), size=n, replace=False)))


def k_shot_sample(ds: datasets.Dataset, task: Task, k: int, seed: int) -> datasets.Dataset:
    """K examples of every label, sampled with `seed`; error if a class has fewer than K."""
    if task.regression:
        raise InputError(f"--k_shot needs a classification task; {task.name} is a regression task")
    labels = np.asarray(ds["label"][:])
    counts = np.bincount(labels, minlength=task.num_labels)
    if counts.min() < k:
        small = int(np.argmin(counts))
        raise InputError(
            f"--k_shot {k} is larger than class {task.label_names[small]!r} has ({counts[small]} "
            f"training examples); allowed: --k_shot <= {counts.min()}"
        )
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c in range(task.num_labels)]
    )
    return ds.select(rng.permutation(chosen))


def make_splits(
    task: Task,
    data: datasets.DatasetDict,
    *,
    dev_size: float | None,
    test_size: float,
    k_shot: int | None,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    seed: int,
) -> Splits:
    """train/dev/test from a loaded task: a labelled test split if there is one, else one held out of train; the
    dev split is the local validation file when a test file exists too, else held out of train."""
    train = data["train"]
    if "test" in data:
        test = data["test"]
    else:
        train, test = _holdout(train, test_size, task)
    if "validation" in data:
        dev = data["validation"]
    else:
        size = (
            dev_size if dev_size is not None else min(DEFAULT_DEV_MAX, max(1, int(DEFAULT_DEV_FRACTION * len(train))))
        )
        train, dev = _holdout(train, size, task)
    train = _subset(train, max_train_samples)
    if k_shot is not None:
        train = k_shot_sample(train, task, k_shot, seed)
    return Splits(train, _subset(dev, max_eval_samples), _subset(test, max_eval_samples))


# --- tokenisation ----------------------------------------------------------------------------------------------
def verbalizer_ids(tokenizer, task: Task, family: str) -> list[list[int]]:
    """Token ids of each label word as the model must produce it (decoder: after a space, then EOS)."""
    ids = []
    for word in task.verbalizer:
        if family == DECODER:
            tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                tokens = tokens + [tokenizer.eos_token_id]
        else:
            tokens = tokenizer(word)["input_ids"]
        ids.append(tokens)
    for i in range(len(ids)):
        for j in range(i):
            if ids[i] == ids[j]:
                raise InputError(
                    f"verbalizer words {task.verbalizer[j]!r} and {task.verbalizer[i]!r} tokenize "
                    "identically; pass distinct words with --verbalizer"
                )
    return ids


def encode(
    ds: datasets.Dataset,
    task: Task,
    family: str,
    tokenizer,
    max_length: int,
    *,
    training: bool,
    label_ids: list[list[int]] | None = None,
) -> datasets.Dataset:
    """Model inputs for one split: input_ids, attention_mask (+token_type_ids), and labels or class_labels."""
    if family == ENCODER:
        pairs = any(ds["text_b"][:])

        def fn(batch: dict) -> dict:
            enc = tokenizer(batch["text_a"], batch["text_b"] if pairs else None, truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return dict(enc)

    elif family == ENCODER_DECODER:

        def fn(batch: dict) -> dict:
            enc = tokenizer([f"{task.name} {p}" for p in batch["prompt"]], truncation=True, max_length=max_length)
            if training:
                enc["labels"] = [label_ids[y] for y in batch["label"]]
            else:
                enc["class_labels"] = batch["label"]
            return dict(enc)

    elif family == DECODER:
        cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
        room = max_length - len(cue) - max(len(t) for t in label_ids)
        if room < 8:
            raise InputError(f"--max_seq_length {max_length} leaves no room for the text with this verbalizer")

        def fn(batch: dict) -> dict:
            body = tokenizer(batch["prompt"], truncation=True, max_length=room)["input_ids"]
            out: dict[str, list] = {"input_ids": [], "attention_mask": []}
            out["labels" if training else "class_labels"] = []
            for ids, y in zip(body, batch["label"], strict=True):
                prompt = ids + cue
                if training:
                    target = label_ids[y]
                    out["input_ids"].append(prompt + target)
                    out["labels"].append([-100] * len(prompt) + target)
                else:
                    out["input_ids"].append(prompt)
                    out["class_labels"].append(y)
                out["attention_mask"].append([1] * len(out["input_ids"][-1]))
            return out

    else:
        raise ValueError(f"unknown family {family!r}")
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=f"tokenizing ({family})")


class Collator:
    """Right-pads a batch: input ids with the pad id, masks with 0, token labels with -100 (ignored by the loss).

    Decoder-only models are right-padded too for training and scoring: every example then starts at position 0,
    and padding never carries loss or score. Generation pads on the left (see `generate`).
    """

    def __init__(self, pad_token_id: int):
        self.pad = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], list):
                width = max(len(v) for v in values)
                batch[key] = torch.tensor([v + [self.pad[key]] * (width - len(v)) for v in values])
            else:
                batch[key] = torch.tensor(values)
        return batch


# --- answer-only logits ---------------------------------------------------------------------------------------
# A decoder's training loss and verbalizer score read the logits of a few positions (those predicting the answer's
# tokens), but the LM head projects every position onto the vocabulary (49,152 rows for SmolLM2): passing those
# positions as `logits_to_keep` skips the rest of that projection, of its backward pass and of the softmax.
# Positions are counted from the end of the sequence, so that virtual tokens a prompt method prepends (prompt
# tuning, RPT, XPrompt) do not shift them. `benchmarks/answer_logits.py` measures the saving.


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under the PEFT wrapper can skip logits (every decoder in transformers >= 4.50)."""
    return "logits_to_keep" in inspect.signature(unwrap_peft_model(model).forward).parameters


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions (negative, from the end) whose next token carries loss in some row of a right-padded batch."""
    return torch.nonzero((labels[:, 1:] != -100).any(0)).squeeze(1) - labels.shape[1]


def answer_targets(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(batch, positions) the token each kept position predicts, -100 where that row has none."""
    return labels[:, positions + labels.shape[1] + 1]


@torch.no_grad()
def score_classes(
    model, batch: dict[str, torch.Tensor], label_ids: list[list[int]], family: str, pad_token_id: int
) -> torch.Tensor:
    """(batch, classes) log-likelihood of each label's verbalizer tokens given the input (summed over tokens)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    scores = torch.empty(input_ids.shape[0], len(label_ids), device=input_ids.device)
    for c, target in enumerate(label_ids):
        target_t = torch.tensor(target, device=input_ids.device)
        if family == ENCODER_DECODER:
            labels = target_t.expand(input_ids.shape[0], -1).contiguous()
            logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
            logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            scores[:, c] = logp.sum(-1)
            continue
        lengths = mask.sum(1)
        width = int(lengths.max()) + len(target)
        seqs = torch.full((input_ids.shape[0], width), pad_token_id, device=input_ids.device)
        seq_mask = torch.zeros_like(seqs)
        for i, n in enumerate(lengths.tolist()):
            seqs[i, :n] = input_ids[i, :n]
            seqs[i, n : n + len(target)] = target_t
            seq_mask[i, : n + len(target)] = 1
        labels = torch.where(seq_mask.bool(), seqs, -100)
        labels[torch.arange(width, device=seqs.device) < lengths.unsqueeze(1)] = -100  # the target's tokens only
        positions = answer_positions(labels)
        if accepts_logits_to_keep(model):
            logits = model(input_ids=seqs, attention_mask=seq_mask, logits_to_keep=positions).logits
        else:
            logits = model(input_ids=seqs, attention_mask=seq_mask).logits[:, positions]
        targets = answer_targets(labels, positions)  # (batch, kept): -100 where a kept position is another row's
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores[:, c] = logp.masked_fill(targets == -100, 0).sum(-1)
    return scores

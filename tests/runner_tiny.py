"""Tiny models WITH tokenizers, and small labelled files, for the runner tests.

The runner loads a model folder like a user's checkpoint (config, weights, tokenizer), so the tiny random models of
tests/tiny.py get a word-level tokenizer over the few words of the test data.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from tiny import VOCAB, tiny_config
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "</s>", "[UNK]", "[CLS]", "[SEP]"]  # ids 0 (pad) and 1 (eos) as in tiny_config
POSITIVE = ["good", "great", "fine", "nice", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "film", "was", "is", "a", "plot", "actor", "story", "really", "very", "and", "but"]
PROMPT_WORDS = [
    "text",
    "sentence",
    "review",
    "answer",
    ":",
    "local",
    "train",
    "neg",
    "pos",
    "negative",
    "positive",
    "yes",
    "no",
    "score",
    "mid",
]
WORDS = POSITIVE + NEGATIVE + FILLER + PROMPT_WORDS
assert len(SPECIALS) + len(WORDS) <= VOCAB

AUTO = {
    "bert": AutoModel,
    "gpt2": AutoModelForCausalLM,
    "llama": AutoModelForCausalLM,
    "t5": AutoModelForSeq2SeqLM,
}


def save_tokenizer(path: Path, family: str) -> None:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 3), ("[SEP]", 4)],
        )
    elif family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        eos_token="</s>",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=128,
    )
    fast.save_pretrained(path)


def save_model(directory: Path, family: str, seed: int = 0) -> Path:
    """A tiny random model of `family` with a tokenizer, saved as a user checkpoint would be."""
    path = Path(directory) / f"tiny-{family}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = tiny_config(family)
    if family == "bert":
        config.architectures = ["BertModel"]
    AUTO[family].from_config(config).save_pretrained(path)
    save_tokenizer(path, family)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable toy sentiment: the label is the polarity of the one opinion word in the sentence."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        opinion = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, 4) + [opinion]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": "pos" if label else "neg", "score": float(label)})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

"""Tiny models WITH tokenizers, and small labelled files, for the runner tests.

The runner loads a model folder like a user's checkpoint (config, weights, tokenizer), so the tiny random models of
tests/tiny.py get a word-level tokenizer over the few words of the test data.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
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


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2's byte-level BPE, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(
    path: Path,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
) -> Path:
    """A tiny LLaMA GGUF file like llama.cpp writes (byte-level BPE tokenizer, Q8_0/Q4_1 and F32 tensors)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *_byte_level_alphabet(), "Ġa", "Ġt", "es"]
    tokens += [f"<extra_{i}>" for i in range(-len(tokens) % 32)]  # rows of quantized blocks of 32
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ a", "Ġ t", "e s"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)

    def tensor(name: str, shape: tuple[int, ...], kind=GGMLQuantizationType.Q8_0) -> None:
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if kind == GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quantize(values, kind), raw_dtype=kind)

    head_dim = hidden // heads
    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("output_norm.weight", (hidden,), GGMLQuantizationType.F32)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), GGMLQuantizationType.F32)
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), GGMLQuantizationType.F32)
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden), GGMLQuantizationType.Q4_1)
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), GGMLQuantizationType.Q4_1)
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_gate.weight", (intermediate, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (intermediate, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, intermediate))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- a worker that dies: Ray's `worker_process_setup_hook` in tests/test_runner_ray.py ---------------------------
KILL, KILLED = "KILL_AFTER_FIRST_CHECKPOINT", "KILLED"


def install_fault_hook() -> None:
    """A run whose output dir holds the file KILL kills its own worker process with SIGKILL right after its first
    complete checkpoint, as a lost node or the out-of-memory killer would. The file is renamed to KILLED first,
    so only the first attempt dies."""
    from peftlab.runner.train import RunnerTrainer

    save = RunnerTrainer._save_checkpoint

    def save_then_die(self, model, trial) -> None:
        save(self, model, trial)
        marker = Path(self.args.output_dir) / KILL
        if marker.exists():
            marker.rename(marker.with_name(KILLED))
            os.kill(os.getpid(), signal.SIGKILL)

    RunnerTrainer._save_checkpoint = save_then_die

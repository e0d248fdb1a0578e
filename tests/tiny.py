"""Tiny random models of every family and task type, and the fresh-process round trip shared by method tests.

The base model is built from a config with a fixed seed and saved to disk, so that a child Python process (which
must import peftlab itself, like any user's process) can load the very same weights by path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

VOCAB = 96
NUM_LABELS = 3
GENERATIVE = {"CAUSAL_LM", "SEQ_2_SEQ_LM"}

AUTO_MODEL = {
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "QUESTION_ANS": AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": AutoModel,
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
}

# (task type, model family) pairs that every method must support
TASK_FAMILIES = [
    ("SEQ_CLS", "bert"),
    ("TOKEN_CLS", "bert"),
    ("QUESTION_ANS", "bert"),
    ("FEATURE_EXTRACTION", "bert"),
    ("CAUSAL_LM", "gpt2"),
    ("CAUSAL_LM", "llama"),
    ("SEQ_2_SEQ_LM", "t5"),
]


def tiny_config(family: str, num_labels: int = NUM_LABELS, hidden_size: int = 32):
    """hidden_size: 32 by default; 4-bit checks need 64 (bitsandbytes' CPU inference packs the weight in blocks of
    64 input features)."""
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1, "num_labels": num_labels}
    if family == "bert":
        return BertConfig(
            hidden_size=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=128,
            **common,
        )
    if family == "roberta":
        return RobertaConfig(
            hidden_size=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=128,
            bos_token_id=2,
            **common,
        )
    if family == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, **common)
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            **common,
        )
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            tie_word_embeddings=False,
            **common,
        )
    if family == "bart":
        return BartConfig(
            d_model=hidden_size,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=2 * hidden_size,
            decoder_ffn_dim=2 * hidden_size,
            max_position_embeddings=128,
            bos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            **common,
        )
    if family == "t5":
        return T5Config(
            d_model=hidden_size,
            d_kv=hidden_size // 4,
            d_ff=2 * hidden_size,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **common,
        )
    raise ValueError(f"unknown family {family!r}")


def save_tiny_base(directory: Path, task_type: str, family: str, seed: int = 0, hidden_size: int = 32) -> Path:
    """Build a random tiny model for the task, save it, and return its folder (its `name_or_path`)."""
    torch.manual_seed(seed)
    num_labels = 2 if task_type == "QUESTION_ANS" else NUM_LABELS
    model = AUTO_MODEL[task_type].from_config(tiny_config(family, num_labels, hidden_size))
    path = Path(directory) / (f"base-{family}-{task_type.lower()}" + ("" if hidden_size == 32 else f"-h{hidden_size}"))
    model.save_pretrained(path)
    return path


def load_base(path: Path, task_type: str):
    return AUTO_MODEL[task_type].from_pretrained(path)


def make_batch(task_type: str, batch_size: int = 4, seq_len: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch with task-appropriate targets (the last example is shorter)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[-1, -3:] = 0
    attention_mask[-1, -3:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task_type == "SEQ_CLS":
        batch["labels"] = torch.randint(0, NUM_LABELS, (batch_size,), generator=g)
    elif task_type == "TOKEN_CLS":
        labels = torch.randint(0, NUM_LABELS, (batch_size, seq_len), generator=g)
        labels[attention_mask == 0] = -100
        batch["labels"] = labels
    elif task_type == "QUESTION_ANS":
        batch["start_positions"] = torch.randint(0, seq_len - 4, (batch_size,), generator=g)
        batch["end_positions"] = batch["start_positions"] + 2
    elif task_type == "CAUSAL_LM":
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        batch["labels"] = labels
    elif task_type == "SEQ_2_SEQ_LM":
        batch["labels"] = torch.randint(2, VOCAB, (batch_size, 5), generator=g)
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its targets: what inference receives."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def loss_of(output) -> torch.Tensor:
    """The scalar training loss, also for feature extraction (which has no head and no targets)."""
    if getattr(output, "loss", None) is not None:
        return output.loss
    first = output.last_hidden_state[:, 0]
    target = torch.linspace(-2.0, 2.0, first.shape[-1])
    return (first - target).pow(2).mean()


def train_steps(model, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one batch; returns the loss before each step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model(**batch))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


@torch.no_grad()
def outputs_of(
    model, task_type: str, batch: dict[str, torch.Tensor], max_new_tokens: int = 5, use_cache: bool = True
) -> dict:
    """Eval-mode outputs to compare across processes: the main output tensor(s) and greedy generations."""
    model.eval()
    inputs = model_inputs(batch)
    # an encoder-decoder needs decoder inputs: teacher-force the targets
    out = model(**inputs, labels=batch["labels"]) if task_type == "SEQ_2_SEQ_LM" else model(**inputs)
    result = {}
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            result[name] = value.detach().cpu()
    if task_type in GENERATIVE:
        result["generated"] = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, use_cache=use_cache
        ).cpu()
    return result


CHILD = Path(__file__).with_name("roundtrip_child.py")


def outputs_in_fresh_process(
    tmp_path: Path,
    *,
    task_type: str,
    batch: dict,
    adapter: Path,
    base: Path | None = None,
    loader: str = "peft",
    import_peftlab: bool = True,
) -> dict:
    """Load an adapter (or an exported model) in a new Python process and return its outputs for `batch`.

    loader: "peft" (PeftModel.from_pretrained on `base`), "auto" (AutoPeftModelFor*), or "transformers"
    (a plain transformers model saved at `adapter`, e.g. a merged export).
    """
    batch_file = tmp_path / "batch.pt"
    out_file = tmp_path / f"out-{loader}-{int(import_peftlab)}.pt"
    torch.save(batch, batch_file)
    args = {
        "task_type": task_type,
        "adapter": str(adapter),
        "base": str(base) if base else None,
        "loader": loader,
        "import_peftlab": import_peftlab,
        "batch": str(batch_file),
        "out": str(out_file),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"child process failed:\n{proc.stderr[-4000:]}")
    return torch.load(out_file)


def outputs_in_one_fresh_process(
    tmp_path: Path, jobs: list[dict], import_peftlab: bool = True, catch_errors: bool = False
) -> list[dict]:
    """Like `outputs_in_fresh_process`, for several loads (dicts of its keyword arguments, without import_peftlab)
    done one after the other in a single new Python process: one interpreter start for many round trips.
    A job with `encoder_state=True` also returns the loaded prompt encoder's state dict under "encoder_state".
    `catch_errors=True`: a load that raises returns {"error": its traceback} instead of failing every job."""
    child_jobs = []
    for i, job in enumerate(jobs):
        batch_file, out_file = tmp_path / f"batch-{i}.pt", tmp_path / f"out-{i}-{int(import_peftlab)}.pt"
        torch.save(job["batch"], batch_file)
        child_jobs.append(
            {
                "task_type": job["task_type"],
                "adapter": str(job["adapter"]),
                "base": str(job["base"]) if job.get("base") else None,
                "loader": job.get("loader", "peft"),
                "batch": str(batch_file),
                "out": str(out_file),
                "encoder_state": job.get("encoder_state", False),
            }
        )
    args = {"import_peftlab": import_peftlab, "jobs": child_jobs, "catch_errors": catch_errors}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(CHILD), json.dumps(args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"child process failed:\n{proc.stderr[-4000:]}")
    return [torch.load(job["out"]) for job in child_jobs]


def assert_same_outputs(expected: dict, actual: dict, atol: float = 0.0) -> None:
    assert expected.keys() == actual.keys(), (expected.keys(), actual.keys())
    for name, value in expected.items():
        if name == "generated":
            assert torch.equal(value, actual[name]), f"generations differ:\n{value}\n{actual[name]}"
        else:
            torch.testing.assert_close(actual[name], value, atol=atol, rtol=0, msg=f"{name} differs")

"""`peftlab generate`: greedy generation from a causal or text-to-text model, optionally with a trained adapter
(a `peftlab train` output folder). Batches are left-padded, as decoder-only generation needs."""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.runner.errors import InputError
from peftlab.runner.models import DECODER, ENCODER, detect_family, load_config, resolve_model_path


def generate(
    model_name_or_path: str,
    prompts: list[str],
    *,
    adapter: str | Path | None = None,
    max_new_tokens: int = 32,
    chat: bool = False,
) -> list[str]:
    """The continuation of each prompt (greedy). chat: wrap each prompt in the tokenizer's chat template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_model_path(model_name_or_path)
    family = detect_family(load_config(path))
    if family == ENCODER:
        raise InputError(f"generate needs a decoder-only or encoder-decoder model; {path} is an encoder")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(
            f"--adapter {adapter} holds no adapter_config.json (a full fine-tuning run is a model: "
            "pass it as --model_name_or_path)"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    if chat and not tokenizer.chat_template:
        raise InputError(f"--chat: the tokenizer of {path} has no chat template")
    auto = AutoModelForCausalLM if family == DECODER else AutoModelForSeq2SeqLM
    model = auto.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if chat
        else p
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    if family == DECODER:
        out = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(out, skip_special_tokens=True)

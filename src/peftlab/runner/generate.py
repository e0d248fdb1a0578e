"""`peftlab generate`: greedy generation from a causal or text-to-text model, optionally with a trained adapter
(a `peftlab train` output folder). Batches are left-padded, as decoder-only generation needs."""

from __future__ import annotations

from pathlib import Path

import torch

from peftlab.runner.errors import InputError
from peftlab.runner.models import DECODER, ENCODER, detect_family, load_config, resolve_model_path


def _stock_prompt_on_decoder(model: torch.nn.Module, family: str) -> bool:
    """A stock prompt-learning adapter (prompt tuning, P-tuning, prefix tuning) on a decoder. peft 0.21.2 looks for the
    KV cache under transformers' old kwarg name and injects the prompt again at every cached step, and its uncached
    prefix-tuning generation places the tokens at other positions than its forward does. peftlab's own prompt types
    are fixed in integration.py (patch 8), which leaves stock types as stock PEFT has them."""
    from peft import PeftModel

    from peftlab.integration import PEFTLAB_PROMPT_TYPES

    if family != DECODER or not isinstance(model, PeftModel):
        return False
    config = model.active_peft_config
    return config.is_prompt_learning and config.peft_type not in PEFTLAB_PROMPT_TYPES


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
    if _stock_prompt_on_decoder(model, family):
        return [tokenizer.decode(_greedy_by_forward(model, tokenizer, t, max_new_tokens, not chat)) for t in texts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    if family == DECODER:
        out = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(out, skip_special_tokens=True)


@torch.no_grad()
def _greedy_by_forward(model, tokenizer, text: str, max_new_tokens: int, add_special_tokens: bool) -> list[int]:
    """Greedy decoding of one unpadded prompt by full forwards of the adapted model (the training forward), no KV
    cache: exact where stock PEFT's generate is not (see `_stock_prompt_on_decoder`), quadratic in the length."""
    ids = tokenizer([text], return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) - {None}
    new: list[int] = []
    while len(new) < max_new_tokens and not (new and new[-1] in stop):
        token = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
        new.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return [t for t in new if t not in tokenizer.all_special_ids]

"""Shared look-ups for the XPrompt algorithms: find the XPrompt encoder of a model or fail clearly."""

from __future__ import annotations

import torch
from peft import PeftModel

from peftlab.methods.xprompt.config import XPromptConfig
from peftlab.methods.xprompt.encoder import XPromptEmbedding


def xprompt_parts(
    model: PeftModel, adapter_name: str | None = None, *, trainable: bool = False
) -> tuple[str, XPromptConfig, XPromptEmbedding]:
    """(adapter name, config, encoder) of the active XPrompt adapter; ValueError for anything else."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"XPrompt needs a peft.PeftModel with an XPrompt adapter, got {type(model).__name__}")
    adapter_name = adapter_name or model.active_adapter
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, XPromptConfig):
        found = None if config is None else config.peft_type
        raise ValueError(f"adapter {adapter_name!r} is not an XPrompt adapter (peft type {found})")
    if adapter_name != model.active_adapter:
        raise ValueError(
            f"adapter {adapter_name!r} is not the active adapter ({model.active_adapter!r}): call set_adapter first"
        )
    encoder = model.prompt_encoder[adapter_name]
    if trainable and config.inference_mode:
        raise ValueError(
            f"adapter {adapter_name!r} was loaded for inference (inference_mode=True); pruning and rewinding need "
            "a trainable XPrompt model (get_peft_model, then load_adapter(..., is_trainable=True) to resume)"
        )
    return adapter_name, config, encoder


def sync_prompt_tokens(model: PeftModel, adapter_name: str) -> None:
    """Keep peft's virtual-token ids in step with the (pruned) prompt length."""
    config = model.peft_config[adapter_name]
    device = model.prompt_tokens[adapter_name].device
    model.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens, device=device).long()

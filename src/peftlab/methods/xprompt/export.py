"""Export an XPrompt adapter as a plain PROMPT_TUNING adapter holding only the surviving tokens."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from peft import PeftModel, PromptTuningConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from peftlab.methods.xprompt.encoder import EXTRA_KEYS


def export_xprompt(model: PeftModel, adapter_name: str, folder: Path) -> None:
    """Stock peft reads "prompt_embeddings" directly in inference mode, and ours is already the effective (pruned,
    masked) prompt, so the stock adapter is the same weights minus the mask keys, with a PROMPT_TUNING config of
    the current length. The task head (modules_to_save) is kept as saved."""
    config = model.peft_config[adapter_name]
    stock_fields = {
        f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(PromptTuningConfig) if f.init
    }
    stock_fields.update(peft_type=None, inference_mode=True, num_transformer_submodules=1)
    stock_config = PromptTuningConfig(**stock_fields)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {key: value.contiguous() for key, value in state.items() if key not in EXTRA_KEYS}
    stock_config.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

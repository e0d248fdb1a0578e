"""Export a Residual Prompt Tuning adapter as a plain stock PROMPT_TUNING adapter of its reparameterized prompt.

After training the MLP is only a way to produce P'; stock prompt tuning with `prompt_embeddings = P'` gives the very
same inputs to the base model, so the export loads with stock PEFT alone and produces identical outputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import PeftModel, PromptTuningConfig, PromptTuningInit
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from peftlab.methods.residual_prompt_tuning.encoder import TRAINING_STATE_PREFIX

# PromptLearningConfig fields that carry over unchanged; everything else is Residual-Prompt-Tuning specific
_SHARED_FIELDS = (
    "task_type",
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
    "base_model_name_or_path",
    "revision",
)


def export_residual_prompt_tuning(model: PeftModel, adapter_name: str, folder: Path) -> None:
    """Write `adapter_config.json` (peft_type PROMPT_TUNING) and `adapter_model.safetensors` into `folder`."""
    config = model.peft_config[adapter_name]
    stock_fields = copy.deepcopy({name: getattr(config, name) for name in _SHARED_FIELDS})
    if stock_fields["base_model_name_or_path"] is None:  # as PeftModel.save_pretrained fills it for prompt methods
        stock_fields["base_model_name_or_path"] = model.base_model.__dict__.get("name_or_path") or None
    # RANDOM init: the loaded prompt is overwritten by the saved one, and nothing else (no tokenizer) is needed
    stock = PromptTuningConfig(**stock_fields, prompt_tuning_init=PromptTuningInit.RANDOM, inference_mode=True)
    # the same payload `save_pretrained` writes (P' and any task head), minus the raw prompt and the MLP
    state = {
        key: value.detach().cpu().clone().contiguous()
        for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
        if not key.startswith(TRAINING_STATE_PREFIX)
    }
    stock.save_pretrained(str(folder))
    save_file(state, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})

"""Residual Prompt Tuning (Razdaibiedina et al., ACL Findings 2023) as the PEFT type RESIDUAL_PROMPT_TUNING."""

from peftlab.export import register_exporter
from peftlab.integration import register_method
from peftlab.methods.residual_prompt_tuning.config import PEFT_TYPE_NAME, ResidualPromptTuningConfig
from peftlab.methods.residual_prompt_tuning.encoder import ResidualPromptEncoder
from peftlab.methods.residual_prompt_tuning.export import export_residual_prompt_tuning

register_exporter(
    register_method(PEFT_TYPE_NAME, ResidualPromptTuningConfig, ResidualPromptEncoder, prompt_learning=True),
    export_residual_prompt_tuning,
)

__all__ = ["ResidualPromptEncoder", "ResidualPromptTuningConfig"]

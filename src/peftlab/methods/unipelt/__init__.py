"""UniPELT (Mao et al., ACL 2022): gated LoRA + gated prefix tuning + gated bottleneck adapter, as a PEFT tuner."""

from peftlab.integration import register_method
from peftlab.methods.unipelt.config import UniPELTConfig
from peftlab.methods.unipelt.model import UniPELTModel

register_method("UNIPELT", UniPELTConfig, UniPELTModel)

__all__ = ["UniPELTConfig", "UniPELTModel"]

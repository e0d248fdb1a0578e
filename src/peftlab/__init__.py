"""peftlab: research PEFT methods for stock Hugging Face PEFT.

Importing the package registers its methods with `peft`, so `get_peft_model`, `PeftModel.from_pretrained` and the
`AutoPeftModelFor*` classes accept their configs and saved adapters.
"""

from peftlab import (
    integration,  # noqa: F401  (registers the PEFT types and installs the compatibility patches)
    xprompt,  # noqa: F401  (public XPrompt algorithms: peftlab.xprompt.prune etc.)
)
from peftlab.export import export_adapter
from peftlab.integration import allow_pickled_adapters, refuse_pickled_adapters
from peftlab.methods.bitfit import BitFitConfig
from peftlab.methods.residual_prompt_tuning import ResidualPromptTuningConfig
from peftlab.methods.unipelt import UniPELTConfig
from peftlab.methods.xprompt import XPromptConfig

__all__ = [
    "BitFitConfig",
    "ResidualPromptTuningConfig",
    "UniPELTConfig",
    "XPromptConfig",
    "allow_pickled_adapters",
    "export_adapter",
    "refuse_pickled_adapters",
    "xprompt",
]
__version__ = "0.1.0"

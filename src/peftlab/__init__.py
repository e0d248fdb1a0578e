"""peftlab: research PEFT methods for stock Hugging Face PEFT.

Importing the package registers its methods with `peft`, so `get_peft_model`, `PeftModel.from_pretrained` and the
`AutoPeftModelFor*` classes accept their configs and saved adapters.
"""

from peftlab import integration  # noqa: F401  (registers the PEFT types and installs the compatibility patches)
from peftlab.export import export_adapter
from peftlab.methods.unipelt import UniPELTConfig

__all__ = ["UniPELTConfig", "export_adapter"]
__version__ = "0.1.0"

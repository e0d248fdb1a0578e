"""BitFit (Ben Zaken et al., ACL 2022): train bias terms only, plus the task head, as the PEFT type "BITFIT"."""

from peftlab.export import register_exporter
from peftlab.integration import register_method
from peftlab.methods.bitfit.config import BitFitConfig
from peftlab.methods.bitfit.export import export_bitfit
from peftlab.methods.bitfit.layer import BitFitLayer
from peftlab.methods.bitfit.model import BitFitModel

BITFIT = register_method("BITFIT", BitFitConfig, BitFitModel, prompt_learning=False)
register_exporter(BITFIT, export_bitfit)

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitModel"]

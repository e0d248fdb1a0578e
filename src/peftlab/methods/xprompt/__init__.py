"""XPrompt (Ma et al., EMNLP 2022): prompt tuning with importance-scored hierarchical pruning and rewinding."""

from peftlab.export import register_exporter
from peftlab.integration import register_method
from peftlab.methods.xprompt.config import XPromptConfig
from peftlab.methods.xprompt.encoder import XPromptEmbedding
from peftlab.methods.xprompt.export import export_xprompt

XPROMPT = register_method("XPROMPT", XPromptConfig, XPromptEmbedding, prompt_learning=True)
register_exporter(XPROMPT, export_xprompt)

__all__ = ["XPromptConfig", "XPromptEmbedding", "XPROMPT"]

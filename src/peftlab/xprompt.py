"""Public XPrompt API: `importance_scores`, `prune`, `rewind`, `summary`, and the whole pipeline `run`.

A thin facade: the implementation lives in `peftlab.methods.xprompt`.
"""

from peftlab.methods.xprompt.config import XPromptConfig
from peftlab.methods.xprompt.pruning import XPromptSummary, prune, rewind, summary
from peftlab.methods.xprompt.scoring import XPromptScores, importance_scores
from peftlab.methods.xprompt.search import SearchResult, SearchTrial, run

__all__ = [
    "XPromptConfig",
    "XPromptScores",
    "XPromptSummary",
    "SearchResult",
    "SearchTrial",
    "importance_scores",
    "prune",
    "rewind",
    "run",
    "summary",
]

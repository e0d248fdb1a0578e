"""Residual Prompt Tuning at initialisation on all-MiniLM-L6-v2: how much the MLP branch moves the prompt.

Compares, for 10 vocabulary-sampled prompt rows, peftlab's reparameterization (MLP on the raw rows, before BERT's
embedding module adds positions and applies its LayerNorm) with and without the MLP's LayerNorm, and the authors'
BERT placement (arazd/ProgressivePrompts: MLP without LayerNorm on the OUTPUT of `bert.embeddings`). Statistics are
taken on what the first transformer layer receives. Run: `PYTHONPATH=src python benchmarks/rpt_init_geometry.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification

from peftlab import ResidualPromptTuningConfig
from peftlab.runner.models import minilm_dir

N_TOKENS, BOTTLENECK, SEED = 10, 800, 1


def geometry(before: torch.Tensor, after: torch.Tensor) -> str:
    """Mean row norms, cos(after, before) per row, and the mean pairwise cosine of the rows of `after`."""
    unit = F.normalize(after, dim=-1)
    off_diagonal = ~torch.eye(len(after), dtype=torch.bool)
    return (
        f"|P| {before.norm(dim=-1).mean():6.2f}  |branch| {(after - before).norm(dim=-1).mean():6.2f}  "
        f"cos(P', P) {F.cosine_similarity(after, before, dim=-1).mean():5.2f}  "
        f"pairwise cos(P') {(unit @ unit.T)[off_diagonal].mean():5.2f}"
    )


@torch.no_grad()
def main() -> None:
    base = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=6).eval()
    embeddings = base.bert.embeddings

    def seen(rows: torch.Tensor) -> torch.Tensor:  # positions 0..n-1, token type 0, embedding LayerNorm
        return embeddings(inputs_embeds=rows[None])[0]

    for layer_norm in (True, False):
        torch.manual_seed(SEED)
        config = ResidualPromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=N_TOKENS, encoder_layer_norm=layer_norm
        )
        encoder = get_peft_model(base, config).prompt_encoder["default"].eval()
        prompt, reparameterized = encoder.embedding.weight, encoder.reparameterized_prompt()
        name = f"peftlab, MLP LayerNorm {'on ' if layer_norm else 'off'}"
        print(f"{name}, raw rows:     {geometry(prompt, reparameterized)}")
        print(f"{name}, layer input:  {geometry(seen(prompt), seen(reparameterized))}")
    torch.manual_seed(SEED)
    d = base.config.hidden_size
    mlp = nn.Sequential(nn.Linear(d, BOTTLENECK), nn.ReLU(), nn.Linear(BOTTLENECK, d))
    rows = seen(embeddings.word_embeddings.weight[torch.randint(0, base.config.vocab_size, (N_TOKENS,))])
    print(f"authors' BERT placement, layer input:     {geometry(rows, rows + mlp(rows))}")


if __name__ == "__main__":
    main()

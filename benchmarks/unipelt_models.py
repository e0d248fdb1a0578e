"""Benchmark builders for `unipelt_vs_adapters.py` (run inside `harness.py` children).

`ours` runs in peftlab's environment; `peer` runs in the peer environment with AdapterHub `adapters` 1.3 (which pins
transformers 4.57), so this module imports neither at the top. Both build the same BERT-base-sized random model
(default BertConfig, seeded) and the same batch, and train the UniPELT-APL parameters plus the classifier head.
"""

from __future__ import annotations

import torch


def _batch(batch_size: int, seq_len: int, vocab: int = 30522) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[batch_size // 2 :, seq_len * 3 // 4 :] = 0  # half the batch padded by a quarter
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


def ours(batch_size: int = 8, seq_len: int = 128, attn: str = "sdpa"):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig

    from peftlab import UniPELTConfig  # importing peftlab registers UNIPELT with peft

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2), attn_implementation=attn)
    model = get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS"))
    return model, _batch(batch_size, seq_len)


def peer(batch_size: int = 8, seq_len: int = 128, attn: str = "eager"):
    import adapters
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation=attn))
    adapters.init(model)
    model.add_adapter("unipelt", config=adapters.UniPELTConfig())
    model.train_adapter("unipelt")
    model.classifier.requires_grad_(True)  # peftlab trains the head too (PEFT's modules_to_save)
    return model, _batch(batch_size, seq_len)

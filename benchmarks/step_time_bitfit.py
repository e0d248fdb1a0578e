"""BitFit vs stock BEFT (same layers) vs full fine-tuning: median train-step time and peak memory, same run.

Each candidate is measured in its own fresh process by `harness.py`, alternating round after round. Goals (issue 2):
BitFit <= 1.0x BEFT step time, and BitFit's peak memory below full fine-tuning's by at least the weights' gradients
and AdamW states (3 float32 copies of the weights).

    PYTHONPATH=src python benchmarks/step_time_bitfit.py [--size small|base] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import compare, print_table  # noqa: E402

# BERT-style encoders built from a config with random weights: MiniLM-L6 sized, and BERT-base sized
SIZES = {
    "small": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
# the Linear layers of BERT; BEFT can only target Linear layers, so this is the like-for-like comparison
LINEAR_LAYERS = ["query", "key", "value", "dense"]


def _base(size: str):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2, vocab_size=30522, **SIZES[size]))


def _batch(batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


def build(method: str, size: str, batch_size: int, seq_len: int):
    """(model, batch) for one candidate; called by the harness in a fresh process."""
    from peft import BeftConfig, get_peft_model

    from peftlab import BitFitConfig

    model = _base(size)
    if method == "bitfit":
        model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS", bias_terms=LINEAR_LAYERS))
    elif method == "bitfit_all":
        model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    elif method == "beft":
        model = get_peft_model(model, BeftConfig(task_type="SEQ_CLS", target_modules=LINEAR_LAYERS))
    elif method != "full":
        raise ValueError(f"method must be bitfit, bitfit_all, beft or full; got {method!r}")
    return model, _batch(batch_size, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    shape = {"size": args.size, "batch_size": args.batch_size, "seq_len": args.seq_len}
    candidates = {
        "BitFit (BEFT's layers)": ("step_time_bitfit:build", {"method": "bitfit", **shape}),
        "BEFT (stock peft)": ("step_time_bitfit:build", {"method": "beft", **shape}),
        "BitFit (all biases)": ("step_time_bitfit:build", {"method": "bitfit_all", **shape}),
        "full fine-tuning": ("step_time_bitfit:build", {"method": "full", **shape}),
    }
    print(f"BERT-{args.size}, batch {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds of "
          f"{args.steps} steps, {args.threads} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}\n")
    results = compare(candidates, rounds=args.rounds, steps=args.steps, threads=args.threads)
    print_table(results, [
        ("BitFit (BEFT's layers)", "BEFT (stock peft)"),
        ("BitFit (BEFT's layers)", "full fine-tuning"),
        ("BitFit (all biases)", "full fine-tuning"),
    ])
    full = results["full fine-tuning"]
    needed = 3 * 4 * full["trainable"] / 2**20  # float32 gradients + AdamW exp_avg and exp_avg_sq of every weight
    for name in ("BitFit (BEFT's layers)", "BitFit (all biases)"):
        saved = full["peak_mb"] - results[name]["peak_mb"]
        verdict = "meets" if saved >= needed else "MISSES"
        print(f"\n{name}: peak memory {saved:.1f} MiB below full fine-tuning; gradients + AdamW states of the "
              f"weights are {needed:.1f} MiB: {verdict} the goal")
    ratio = results["BitFit (BEFT's layers)"]["step_ms"] / results["BEFT (stock peft)"]["step_ms"]
    print(f"BitFit / BEFT step time {ratio:.3f}x: {'meets' if ratio <= 1.0 else 'MISSES'} the <= 1.0x goal")


if __name__ == "__main__":
    main()

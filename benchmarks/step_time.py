"""Train-step time and peak memory of peftlab's core methods against their stock peers, measured in the same run.

- Residual Prompt Tuning vs stock PROMPT_TUNING and P_TUNING at the same prompt length (goal: <= 1.05x prompt tuning).
- BitFit vs stock BEFT on the same layers, and vs full fine-tuning (goals: <= 1.0x BEFT; peak memory below full
  fine-tuning's by at least the weights' gradients and AdamW states).

Same model (random BERT weights from a config), same batch, same process. Peak memory: each candidate in a fresh
process, rounds alternating (`harness.compare`). Step time: additionally all candidates of a group in one process,
stepping in turns (`harness.interleaved`), which is robust to load from other programs.

    PYTHONPATH=src python benchmarks/step_time.py                       # BERT-base size
    PYTHONPATH=src python benchmarks/step_time.py --size small --rounds 1 --steps 3    # quick check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import compare, interleaved, print_table  # noqa: E402

SIZES = {  # BERT-style encoders: MiniLM-L6 sized and BERT-base sized
    "small": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
LINEAR_LAYERS = ["query", "key", "value", "dense"]  # BERT's Linear layers: what BEFT can target


def _config(method: str, tokens: int):
    from peft import BeftConfig, PromptEncoderConfig, PromptTuningConfig

    from peftlab import BitFitConfig, ResidualPromptTuningConfig

    return {
        "residual_prompt_tuning": lambda: ResidualPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens),
        "prompt_tuning": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens),
        "p_tuning": lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens),
        "bitfit": lambda: BitFitConfig(task_type="SEQ_CLS", bias_terms=LINEAR_LAYERS),
        "bitfit_all": lambda: BitFitConfig(task_type="SEQ_CLS"),
        "beft": lambda: BeftConfig(task_type="SEQ_CLS", target_modules=LINEAR_LAYERS),
        "full": lambda: None,
    }[method]()


def build(method: str, size: str, batch_size: int, seq_len: int, tokens: int):
    """(model with exactly its trainable parameters requiring grad, one batch): the harness's builder."""
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_labels=2, vocab_size=30522, **SIZES[size]))
    config = _config(method, tokens)
    if config is not None:
        model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    return model, batch


def _group(title: str, methods: list[str], pairs: list[tuple[str, str]], shape: dict, args) -> dict[str, dict]:
    candidates = {name: ("step_time:build", {"method": name, **shape}) for name in methods}
    print(f"\n## {title}\n", flush=True)
    results = compare(candidates, rounds=args.rounds, steps=args.steps, threads=args.threads)
    print_table(results, pairs)
    same_process = interleaved(candidates, steps=args.interleaved_steps, threads=args.threads)
    print("\nsame process, stepping in turns:")
    for name, peer in pairs:
        print(f"  {name} / {peer} step time: {same_process[name] / same_process[peer]:.3f}x")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=10, help="prompt length, the same for every prompt method")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--interleaved-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shape = {"size": args.size, "batch_size": args.batch_size, "seq_len": args.seq_len, "tokens": args.tokens}
    device = "CUDA" if torch.cuda.is_available() else f"CPU, {args.threads} threads"
    print(
        f"BERT-{args.size}, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds of {args.steps} steps, "
        f"{device}"
    )

    _group(
        f"Residual Prompt Tuning (prompt length {args.tokens})",
        ["residual_prompt_tuning", "prompt_tuning", "p_tuning"],
        [("residual_prompt_tuning", "prompt_tuning"), ("residual_prompt_tuning", "p_tuning")],
        shape,
        args,
    )

    results = _group(
        "BitFit",
        ["bitfit", "beft", "bitfit_all", "full"],
        [("bitfit", "beft"), ("bitfit", "full"), ("bitfit_all", "full")],
        shape,
        args,
    )
    needed = 3 * 4 * results["full"]["trainable"] / 2**20  # float32 gradients + AdamW exp_avg, exp_avg_sq
    for name in ("bitfit", "bitfit_all"):
        saved = results["full"]["peak_mb"] - results[name]["peak_mb"]
        verdict = "meets" if saved >= needed else "MISSES"
        print(
            f"{name}: peak memory {saved:.1f} MiB below full fine-tuning; the weights' gradients + AdamW states are "
            f"{needed:.1f} MiB: {verdict} the goal"
        )


if __name__ == "__main__":
    main()

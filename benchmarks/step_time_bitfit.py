"""BitFit vs stock BEFT (same layers) vs full fine-tuning: median train-step time and peak memory, same run.

Peak memory (and a first step time) comes from `harness.py`: each candidate in its own fresh process, alternating
round after round. The step-time ratios are then measured again in ONE process on the same batch, the candidates
taking turns step by step, so that load from other programs on a shared machine hits them alike.
Goals (issue 2): BitFit <= 1.0x BEFT step time, and BitFit's peak memory below full fine-tuning's by at least the
weights' gradients and AdamW states (3 float32 copies of the weights).

    PYTHONPATH=src python benchmarks/step_time_bitfit.py [--size small|base] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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
BITFIT, BEFT = "BitFit (BEFT's layers)", "BEFT (stock peft)"
BITFIT_ALL, FULL = "BitFit (all biases)", "full fine-tuning"


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


def interleaved_step_ms(candidates: dict[str, dict], steps: int, warmup: int, threads: int) -> dict[str, float]:
    """Median train-step time (ms) of each candidate, all built in this process and stepped in turns."""
    torch.set_num_threads(threads)
    runs = {}
    for name, kwargs in candidates.items():
        torch.manual_seed(0)
        model, batch = build(**kwargs)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, batch, optimizer)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for step in range(warmup + steps):
        for name in names[step % len(names):] + names[:step % len(names)]:  # rotate who goes first
            model, batch, optimizer = runs[name]
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--interleaved-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    shape = {"size": args.size, "batch_size": args.batch_size, "seq_len": args.seq_len}
    candidates = {
        BITFIT: ("step_time_bitfit:build", {"method": "bitfit", **shape}),
        BEFT: ("step_time_bitfit:build", {"method": "beft", **shape}),
        BITFIT_ALL: ("step_time_bitfit:build", {"method": "bitfit_all", **shape}),
        FULL: ("step_time_bitfit:build", {"method": "full", **shape}),
    }
    print(f"BERT-{args.size}, batch {args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds of "
          f"{args.steps} steps, {args.threads} threads, {'CUDA' if torch.cuda.is_available() else 'CPU'}\n")
    results = compare(candidates, rounds=args.rounds, steps=args.steps, threads=args.threads)
    print_table(results, [(BITFIT, BEFT), (BITFIT, FULL), (BITFIT_ALL, FULL)])
    full = results[FULL]
    needed = 3 * 4 * full["trainable"] / 2**20  # float32 gradients + AdamW exp_avg and exp_avg_sq of every weight
    for name in (BITFIT, BITFIT_ALL):
        saved = full["peak_mb"] - results[name]["peak_mb"]
        verdict = "meets" if saved >= needed else "MISSES"
        print(f"\n{name}: peak memory {saved:.1f} MiB below full fine-tuning; gradients + AdamW states of the "
              f"weights are {needed:.1f} MiB: {verdict} the goal")

    print(f"\nSame process, candidates stepping in turns ({args.interleaved_steps} steps each):")
    same_process = interleaved_step_ms({name: kwargs for name, (_, kwargs) in candidates.items()},
                                       steps=args.interleaved_steps, warmup=2, threads=args.threads)
    for name, ms in same_process.items():
        print(f"  {name}: {ms:.1f} ms")
    ratio = same_process[BITFIT] / same_process[BEFT]
    print(f"BitFit / BEFT step time {ratio:.3f}x: {'meets' if ratio <= 1.0 else 'MISSES'} the <= 1.0x goal")
    print(f"BitFit / full fine-tuning step time {same_process[BITFIT] / same_process[FULL]:.3f}x")


if __name__ == "__main__":
    main()

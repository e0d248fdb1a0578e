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

import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab import claims
from peftlab.runner.args import parse_train_args
from peftlab.runner.data import DECODER, Collator, encode, score_classes, verbalizer_ids
from peftlab.runner.train import load_data, plan_run

CLAIM = "smollm2-lora-beats-zero-shot"  # every SmolLM2 claim scores the same zero-shot side

INSTRUCTION = "Is the sentiment of this movie review positive or negative?\n"
PROMPTS = {"runner's prompt": "", "instruction + runner's prompt": INSTRUCTION}


@torch.no_grad()
def accuracy(
    model, tokenizer, split, task, prefix: str, max_length: int, label_ids: list[list[int]], pad_id: int
) -> float:
    rows = split.map(lambda row: {"prompt": prefix + row["prompt"]})
    encoded = encode(rows, task, DECODER, tokenizer, max_length, training=False, label_ids=label_ids)
    collate, correct = Collator(pad_id), 0
    for start in range(0, len(encoded), 16):
        batch = collate([encoded[i] for i in range(start, min(start + 16, len(encoded)))])
        labels = batch.pop("class_labels")
        correct += int((score_classes(model, batch, label_ids, DECODER, pad_id).argmax(-1) == labels).sum())
    return 100 * correct / len(encoded)


def zero_shot_args(output_dir: str):
    """The zero-shot run of the SmolLM2 claims at the CPU budget, as its sweep passes it to the runner."""
    (claim,) = claims.select([CLAIM])
    settings = {**claim.args, **claims.get_budget("cpu").run_args(claim)}
    flags = [f"--{key}={value}" for key, value in settings.items()]
    argv = ["--model_name_or_path", claim.model, "--task_name", claim.task, "--peft_type", "zero_shot", *flags]
    return parse_train_args([*argv, "--seed", "1", "--output_dir", output_dir, "--report_to", "none"])


def main() -> None:
    with tempfile.TemporaryDirectory() as output_dir:
        plan = plan_run(zero_shot_args(output_dir))
        task, splits = load_data(plan)
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path)
    model = AutoModelForCausalLM.from_pretrained(plan.model_path).eval()
    label_ids = verbalizer_ids(tokenizer, task, DECODER)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length = plan.args.data.max_seq_length
    print("| prompt | dev accuracy | test accuracy |\n|---|---:|---:|")
    for name, prefix in PROMPTS.items():
        dev, test = (
            accuracy(model, tokenizer, s, task, prefix, max_length, label_ids, pad_id)
            for s in (splits.dev, splits.test)
        )
        print(f"| {name} | {dev:.2f} | {test:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""What projecting only the answer's logits saves on SmolLM2: the runner's train step and verbalizer scoring, each
against the full-vocabulary computation it replaces, measured in turns in one process.

A decoder's training row carries loss on the answer's token(s) only, and scoring reads the logits that predict
them, but the LM head projects every position onto SmolLM2's 49,152-word vocabulary (its embedding, tied). The runner
now passes those positions as `logits_to_keep` (`peftlab.runner.data.answer_positions`). Here each method's train
step (the runner's Trainer.training_step plus the optimizer step, on a batch of the SmolLM2 claims' CPU budget:
16 rows, max length 64) runs with the answer-only loss and with stock Trainer's full-logits loss, step for step in
turns, and prints the median times, their ratio and the largest loss difference; then the dev split's first batches
are scored both ways.

    peftlab convert-gguf && python benchmarks/answer_logits.py     # about 5 min on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from peftlab import claims
from peftlab.runner import data as data_mod
from peftlab.runner import train as train_mod
from peftlab.runner.sweep import expand

CLAIM_OF = {
    "full": "smollm2-full-beats-zero-shot",
    "lora": "smollm2-lora-beats-zero-shot",
    "prompt_tuning": "smollm2-prompt_tuning-beats-zero-shot",
}


def claim_trainer(method: str, output_dir: str) -> tuple[train_mod.RunnerTrainer, train_mod.Encoded]:
    """The Trainer of the method's first run in its SmolLM2 claim at the CPU budget, as the sweep would build it."""
    (claim,) = claims.select([CLAIM_OF[method]])
    spec = claims.sweep_specs([claim], claims.get_budget("cpu"), output_dir)[0]
    plan = train_mod.plan_run(expand(spec)[0].parse())
    task, splits = train_mod.load_data(plan)
    encoded = train_mod.encode_data(plan, task, splits)
    model = train_mod.build_model(plan, task, encoded.tokenizer)
    trainer = train_mod.build_trainer(plan, task, splits, encoded, model)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    return trainer, encoded


def use_answer_logits(trainer: train_mod.RunnerTrainer, on: bool) -> None:
    """Switch between the runner's answer-only loss and stock Trainer's (the model's own loss on full logits)."""
    trainer._answer_logits_only = on
    trainer.compute_loss_func = trainer._answer_loss if on else None


def step_seconds(trainer, batch: dict, items: torch.Tensor) -> float:
    start = time.perf_counter()
    trainer.training_step(trainer.model, dict(batch), items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def full_logits_scores(model, batch: dict, label_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """The peer: each label appended to every row, the whole sequence projected, one forward per label."""
    lengths = batch["attention_mask"].sum(1)
    scores = torch.empty(len(lengths), len(label_ids))
    for c, target in enumerate(label_ids):
        width = int(lengths.max()) + len(target)
        seqs = torch.full((len(lengths), width), pad_id)
        mask = torch.zeros_like(seqs)
        for i, n in enumerate(lengths.tolist()):
            seqs[i, : n + len(target)] = torch.cat([batch["input_ids"][i, :n], torch.tensor(target)])
            mask[i, : n + len(target)] = 1
        logp = torch.log_softmax(model(input_ids=seqs, attention_mask=mask).logits[:, -width:].float(), -1)
        rows = torch.arange(len(lengths))
        scores[:, c] = sum(logp[rows, lengths - 1 + j, t] for j, t in enumerate(target))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(CLAIM_OF), choices=list(CLAIM_OF))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after one warm-up each")
    parser.add_argument("--score_batches", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| what | full logits (s) | answer logits (s) | ratio | largest loss difference |\n|---|---:|---:|---:|---:|")
    for method in args.methods:
        with tempfile.TemporaryDirectory() as out:
            trainer, encoded = claim_trainer(method, out)
        batch = trainer.data_collator([encoded.train[i] for i in range(trainer.args.per_device_train_batch_size)])
        items = (batch["labels"][:, 1:] != -100).sum()
        trainer.model.eval()
        with torch.no_grad():  # both losses from the same weights, before any step
            first = {}
            for on in (False, True):
                use_answer_logits(trainer, on)
                first[on] = float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items))
        gap = abs(first[True] - first[False])
        trainer.model.train()
        times: dict[bool, list[float]] = {True: [], False: []}
        for step in range(args.steps + 1):  # the two variants in turns, after one warm-up step each
            for on in (False, True):
                use_answer_logits(trainer, on)
                seconds = step_seconds(trainer, batch, items)
                if step:
                    times[on].append(seconds)
        full, answer = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {method} train step | {full:.2f} | {answer:.2f} | {full / answer:.2f}x | {gap:.1e} |", flush=True)
        if method == "lora":  # scoring: one method suffices (the forward pass is the same for all)
            model, pad_id = trainer.model.eval(), encoded.tokenizer.pad_token_id
            timed: dict[str, float] = {"full": 0.0, "answer": 0.0}
            worst = 0.0
            size = trainer.args.per_device_eval_batch_size
            for start in range(0, args.score_batches * size, size):
                rows = [encoded.dev[i] for i in range(start, start + size)]
                score_batch = trainer.data_collator(rows)
                score_batch.pop("class_labels")
                t0 = time.perf_counter()
                reference = full_logits_scores(model, score_batch, encoded.label_ids, pad_id)
                t1 = time.perf_counter()
                scores = data_mod.score_classes(model, score_batch, encoded.label_ids, data_mod.DECODER, pad_id)
                t2 = time.perf_counter()
                timed["full"] += t1 - t0
                timed["answer"] += t2 - t1
                worst = max(worst, float((scores - reference).abs().max()))
            full, answer = timed["full"], timed["answer"]
            label = f"scoring {args.score_batches} dev batches of {size}"
            print(f"| {label} | {full:.2f} | {answer:.2f} | {full / answer:.2f}x | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()

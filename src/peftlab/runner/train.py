"""`peftlab train`: arguments -> checks -> data -> model -> Trainer -> results.json.

Everything that can be wrong with the input is checked in `plan_run`, before any weights are loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import EarlyStoppingCallback, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import peftlab
from peftlab.runner import data as data_mod
from peftlab.runner import metrics as metrics_mod
from peftlab.runner.args import RunnerTrainingArguments, hyperparameters, method_option_values
from peftlab.runner.errors import InputError, NonFiniteLossError
from peftlab.runner.methods import (
    ENCODER,
    build_peft_config,
    check_method_family,
    check_method_flags,
    get_method,
)
from peftlab.runner.models import (
    TASK_TYPES,
    check_task_family,
    detect_family,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from peftlab.runner.tasks import Task, load_local, load_registered, resolve_task

logger = logging.getLogger("peftlab")
RESULTS = "results.json"
TRAINABLE_STATE = "trainable_state.safetensors"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# --- checkpoints -----------------------------------------------------------------------------------------------
def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints oldest first, without those a kill interrupted (trainer_state.json is written last)."""
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        match = _CHECKPOINT.match(path.name)
        if not match or not path.is_dir():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_trainable_state(model: torch.nn.Module, folder: Path) -> None:
    """Every trainable tensor by parameter name: unlike a saved prompt adapter (P-tuning stores only the
    encoder's output), this restores the exact training state (prompt encoders, heads) on resume."""
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
        str(folder / TRAINABLE_STATE),
    )


def load_trainable_state(model: torch.nn.Module, folder: Path) -> None:
    state = load_file(str(folder / TRAINABLE_STATE))
    params = _trainable(model)
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise RuntimeError(
            f"{folder / TRAINABLE_STATE} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(_trainable(model).items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


class RunnerTrainer(Trainer):
    """Trainer with verbalizer scoring for generative families, exact PEFT checkpoints, and a NaN/inf stop."""

    def __init__(self, *args, family: str, label_ids: list[list[int]] | None, pad_token_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.family, self.label_ids, self.pad_token_id = family, label_ids, pad_token_id

    # Upstream gap: a saved prompt adapter cannot be loaded back into a trainable prompt encoder (peft issue
    # 2256; P-tuning saves only the encoder output), so resume and load_best_model_at_end would lose state.
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if isinstance(self.model, PeftModel):
            save_trainable_state(self.model, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if isinstance(target, PeftModel) and (Path(resume_from_checkpoint) / TRAINABLE_STATE).is_file():
            load_trainable_state(target, Path(resume_from_checkpoint))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = Path(self.state.best_model_checkpoint)
        if isinstance(self.model, PeftModel) and (best / TRAINABLE_STATE).is_file():
            logger.info("loading the best checkpoint %s (dev %s)", best, self.state.best_metric)
            load_trainable_state(self.model, best)
            return
        super()._load_best_model()

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(float(not torch.isfinite(loss).all()), device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every rank stops together, none waits on a collective forever
        if bad.item():
            step = self.state.global_step + 1
            checkpoints = complete_checkpoints(Path(self.args.output_dir))
            kept = f"last good checkpoint kept: {checkpoints[-1]}" if checkpoints else "no checkpoint was saved yet"
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {step} (epoch {self.state.epoch:.2f}); "
                f"training stopped before the optimizer step; {kept}"
            )
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.family == ENCODER:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("class_labels")
        scores = data_mod.score_classes(model, inputs, self.label_ids, self.family, self.pad_token_id)
        loss = -scores.gather(1, labels.unsqueeze(1)).mean()
        return loss.detach(), (None if prediction_loss_only else scores), labels


# --- planning (all input checks, no weights) ---------------------------------------------------------------------
@dataclass
class RunPlan:
    task: Task
    data: datasets.DatasetDict
    method: str
    method_options: dict[str, Any]
    model_path: str
    family: str
    model_type: str
    resume: str | None
    splits: data_mod.Splits


def _local_files(data_args) -> dict[str, str]:
    files = {"train": data_args.train_file}
    if data_args.test_file:
        files["test"] = data_args.test_file
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
    elif data_args.validation_file:
        files["test"] = data_args.validation_file  # the labelled dev file is the test set; dev is held out of train
    return files


def _load_task(data_args) -> tuple[Task, datasets.DatasetDict]:
    if data_args.train_file:
        if data_args.dataset_name:
            raise InputError("give either local files (--train_file) or --dataset_name, not both")
        name = data_args.task_name or Path(data_args.train_file).stem  # --task_name just names a local task
        return load_local(
            _local_files(data_args),
            data_args.text_column or ["text"],
            data_args.label_column,
            data_args.verbalizer,
            name,
        )
    for flag in ("validation_file", "test_file", "text_column"):
        if getattr(data_args, flag):
            raise InputError(f"--{flag} is for local files and needs --train_file")
    task = resolve_task(data_args.task_name, data_args.dataset_name)
    if data_args.verbalizer is not None:
        task = dataclasses.replace(task, verbalizer=tuple(data_args.verbalizer))
    return task, load_registered(task)


def _resume_point(training_args: RunnerTrainingArguments) -> str | None:
    out = Path(training_args.output_dir)
    explicit = training_args.resume_from_checkpoint
    if training_args.overwrite_output_dir:
        return explicit
    if (out / RESULTS).is_file():
        raise InputError(
            f"--output_dir {out} holds a finished run ({RESULTS}); pass --overwrite_output_dir to "
            "train again there, or choose another --output_dir"
        )
    if explicit:
        if not (Path(explicit) / "trainer_state.json").is_file():
            raise InputError(
                f"--resume_from_checkpoint {explicit} is not a checkpoint folder "
                f"(no trainer_state.json); checkpoints there: "
                f"{[p.name for p in complete_checkpoints(Path(explicit).parent)] or 'none'}"
            )
        return explicit
    checkpoints = complete_checkpoints(out) if out.is_dir() else []
    return str(checkpoints[-1]) if checkpoints else None


def plan_run(model_args, data_args, peft_args, training_args) -> RunPlan:
    """Every check that needs no weights: method and its flags, model family, task, data, output dir."""
    method = peft_args.peft_type.lower().replace("-", "_")
    get_method(method)
    options = check_method_flags(method, method_option_values(peft_args))
    resume = _resume_point(training_args)
    if training_args.early_stopping_patience is not None and not training_args.load_best_model_at_end:
        raise InputError(
            "--early_stopping_patience needs --load_best_model_at_end true (and matching "
            "--eval_strategy/--save_strategy)"
        )
    model_path = resolve_model_path(model_args.model_name_or_path)
    config = load_config(model_path)
    family = detect_family(config)
    check_method_family(method, family, config.model_type, options)
    task, raw = _load_task(data_args)
    check_task_family(task, family)
    splits = data_mod.make_splits(
        task,
        raw,
        dev_size=data_args.dev_size,
        test_size=data_args.test_size,
        k_shot=data_args.k_shot,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        seed=training_args.seed,
    )
    return RunPlan(task, raw, method, options, model_path, family, config.model_type, resume, splits)


# --- the run -----------------------------------------------------------------------------------------------------
def _metrics_fn(task: Task, rows: datasets.Dataset):
    extra: dict[str, Any] = {"groups": rows["group"] if task.grouped else None}
    if "candidate" in rows.column_names:
        extra.update(candidates=rows["candidate"], answers=rows["answers"])

    def compute(prediction) -> dict[str, float]:
        preds = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metrics_mod.compute(task.metrics, preds, prediction.label_ids, regression=task.regression, **extra)

    return compute


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


def _rank_checksums(model: torch.nn.Module) -> list[str]:
    own = parameter_checksum(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered


def _clear_previous_run(out: Path) -> None:
    """--overwrite_output_dir: drop the old run's results and checkpoints once the new run has started."""
    (out / RESULTS).unlink(missing_ok=True)
    for checkpoint in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def _write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def run_training(
    model_args, data_args, peft_args, training_args: RunnerTrainingArguments, plan: RunPlan | None = None
) -> dict[str, Any]:
    """Train and evaluate one run; returns (and writes, on the main process) its results."""
    plan = plan or plan_run(model_args, data_args, peft_args, training_args)
    task, family, out = plan.task, plan.family, Path(training_args.output_dir)
    tokenizer = load_tokenizer(model_args.tokenizer_name or plan.model_path, family)
    label_ids = None if family == ENCODER else data_mod.verbalizer_ids(tokenizer, task, family)
    encode = dict(
        task=task,
        family=family,
        tokenizer=tokenizer,
        max_length=data_args.max_seq_length,
        label_ids=label_ids,
    )
    with training_args.main_process_first(desc="tokenizing"):
        train_ds = data_mod.encode(plan.splits.train, training=True, **encode)
        dev_ds = data_mod.encode(plan.splits.dev, training=False, **encode)
        test_ds = data_mod.encode(plan.splits.test, training=False, **encode)

    set_seed(training_args.seed)  # adapter initialisation depends on it: same seed, same run
    peft_config = build_peft_config(plan.method, TASK_TYPES[family], plan.method_options, plan.model_path)
    if peft_config is None and model_args.train_modules:
        raise InputError("--train_modules is for PEFT methods; full fine-tuning trains every module already")
    model, fresh_modules = load_model(plan.model_path, family, task, tokenizer)
    module_names = [name for name, _ in model.named_modules()]
    for wanted in model_args.train_modules or []:
        if not any(name == wanted or name.endswith("." + wanted) for name in module_names):
            raise InputError(f"--train_modules {wanted!r} names no module of {plan.model_path} (e.g. pooler)")
    if peft_config is not None:
        if fresh_modules:
            logger.warning("the checkpoint has no weights for %s: trained with the head", ", ".join(fresh_modules))
        extra_modules = [*fresh_modules, *(model_args.train_modules or [])]
        if extra_modules:
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *extra_modules]
        model = get_peft_model(model, peft_config)
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())

    training_args.remove_unused_columns = False  # the encoded datasets hold model inputs only (+ class_labels)
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin to on CPU (avoids a warning per dataloader)
    callbacks = []
    if training_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    trainer = RunnerTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        processing_class=tokenizer,
        data_collator=data_mod.Collator(tokenizer.pad_token_id),
        compute_metrics=_metrics_fn(task, plan.splits.dev),
        callbacks=callbacks,
        family=family,
        label_ids=label_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    if training_args.overwrite_output_dir and trainer.is_world_process_zero():
        _clear_previous_run(out)
    if plan.resume:
        logger.warning("resuming from %s", plan.resume)
    started = time.perf_counter()
    method_train = get_method(plan.method).train
    if method_train is not None:
        train_result = method_train(trainer, plan.resume)
    else:
        train_result = trainer.train(resume_from_checkpoint=plan.resume)
    train_time = time.perf_counter() - started

    trainer.compute_metrics = _metrics_fn(task, plan.splits.dev)
    dev_metrics = trainer.evaluate(dev_ds, metric_key_prefix="dev")
    trainer.compute_metrics = _metrics_fn(task, plan.splits.test)
    test_metrics = trainer.evaluate(test_ds, metric_key_prefix="test")
    trainer.save_model(str(out))
    checksums = _rank_checksums(trainer.model)
    peak, memory_kind = _peak_memory_mb()

    def strip(metrics: dict, prefix: str) -> dict:
        keep = (*task.metrics, "score", "loss")
        return {name: metrics[f"{prefix}_{name}"] for name in keep if f"{prefix}_{name}" in metrics}

    results = {
        "task": task.name,
        "dataset": task.dataset,
        "method": plan.method,
        "peft_type": plan.method,
        "model": model_args.model_name_or_path,
        "model_path": plan.model_path,
        "model_type": plan.model_type,
        "family": family,
        "task_type": TASK_TYPES[family],
        "metrics": list(task.metrics),
        "seed": training_args.seed,
        "learning_rate": training_args.learning_rate,
        "k_shot": data_args.k_shot,
        "method_options": plan.method_options,
        "hyperparameters": hyperparameters(model_args, data_args, peft_args, training_args),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": 100.0 * trainable / total,
        "num_examples": {"train": len(train_ds), "dev": len(dev_ds), "test": len(test_ds)},
        "dev": strip(dev_metrics, "dev"),
        "test": strip(test_metrics, "test"),
        "train_loss": train_result.training_loss,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": plan.resume,
        "train_time_s": train_time,
        "peak_memory_mb": peak,
        "memory_kind": memory_kind,
        "world_size": training_args.world_size,
        "rank_checksums": checksums,
        "peftlab_version": peftlab.__version__,
    }
    if trainer.is_world_process_zero():
        _write_json_atomically(out / RESULTS, results)
    return results

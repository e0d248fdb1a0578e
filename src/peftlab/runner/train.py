"""`peftlab train`: one run as a straight pipeline (see `run_training`, at the end):

arguments (args.py) -> 1. plan (every check) -> 2. data -> 3. encoded data -> 4. model -> 5. trainer -> 6. training
-> 7. results.json. Everything that can be wrong with the input is refused in 1 (arguments, method, model family,
output dir) or 2 (task, columns, splits), before any weights are loaded.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import SequentialSampler
from transformers import EarlyStoppingCallback, PreTrainedConfig, Trainer, set_seed
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

import peftlab
from peftlab.export import export_adapter, exportable
from peftlab.runner import data as data_mod
from peftlab.runner import metrics as metrics_mod
from peftlab.runner.args import (
    DataArguments,
    RunArguments,
    RunnerTrainingArguments,
    apply_recipe,
    hyperparameters,
)
from peftlab.runner.errors import InputError, NonFiniteLossError
from peftlab.runner.methods import METHODS, build_peft_config, check_method_family, train_options
from peftlab.runner.models import (
    DECODER,
    ENCODER,
    TASK_TYPES,
    check_task_family,
    detect_family,
    load_config,
    load_model,
    load_tokenizer,
    model_class,
    resolve_model_path,
)
from peftlab.runner.progress import ProgressCallback, RunProgress
from peftlab.runner.tasks import Task, load_local, load_registered, resolve_task

logger = logging.getLogger("peftlab")
RESULTS = "results.json"
TRAINABLE_STATE = "trainable_state.safetensors"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# --- the run ---------------------------------------------------------------------------------------------------
def run_training(
    args: RunArguments,
    *,
    launch: Mapping[str, str] | None = None,
    on_progress: Callable[[RunProgress], None] | None = None,
) -> dict[str, Any]:
    """One run, arguments to results.json; returns the results.

    launch: how the run was started, recorded in results.json (default: `peftlab train` on this machine).
    on_progress: called with the run's progress after its first step and at least every 30 s.
    """
    plan = plan_run(args)
    task, splits = load_data(plan)
    encoded = encode_data(plan, task, splits)
    model = build_model(plan, task, encoded.tokenizer)
    trainer = build_trainer(plan, task, splits, encoded, model, on_progress)
    trained = train(plan, trainer)
    return finish(plan, task, splits, encoded, trainer, trained, launch or this_machine("train"))


def this_machine(launcher: str) -> dict[str, str]:
    """results.json's record of where a run ran."""
    return {"launcher": launcher, "node": socket.gethostname()}


# --- 1. plan: every check that needs neither data nor weights ----------------------------------------------------
@dataclass(frozen=True)
class RunPlan:
    args: RunArguments
    output_dir: Path
    resume: str | None
    model_path: str
    model_type: str
    family: str
    peft_config: PeftConfig | None  # None: full fine-tuning


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


def _check_train_modules(wanted: list[str], config: PreTrainedConfig, family: str, model_path: str) -> None:
    """--train_modules must name modules of the model: checked on a weightless copy built from the config."""
    with init_empty_weights():
        names = [name for name, _ in model_class(family).from_config(config).named_modules()]
    for module in wanted:
        if not any(name == module or name.endswith("." + module) for name in names):
            raise InputError(f"--train_modules {module!r} names no module of {model_path} (e.g. pooler)")


def plan_run(args: RunArguments) -> RunPlan:
    """Method, options, output dir, model family, the method's recipe for that family, and PEFT config: all checked
    before data or weights load."""
    training = args.training
    resume = _resume_point(training)
    if training.early_stopping_patience is not None and not training.load_best_model_at_end:
        raise InputError(
            "--early_stopping_patience needs --load_best_model_at_end true (and matching "
            "--eval_strategy/--save_strategy)"
        )
    model_path = resolve_model_path(args.model.model_name_or_path)
    config = load_config(model_path)
    family = detect_family(config)
    args = apply_recipe(args, family)
    check_method_family(args.method, family, config.model_type, args.method_options)
    peft_config = build_peft_config(args.method, TASK_TYPES[family], args.method_options, model_path)
    if args.model.train_modules:
        if peft_config is None:
            raise InputError("--train_modules is for PEFT methods; full fine-tuning trains every module already")
        _check_train_modules(args.model.train_modules, config, family, model_path)
    return RunPlan(args, Path(training.output_dir), resume, model_path, config.model_type, family, peft_config)


# --- 2. data: the task and its train/dev/test splits -------------------------------------------------------------
def _local_files(data_args: DataArguments) -> dict[str, str]:
    files = {"train": data_args.train_file}
    if data_args.test_file:
        files["test"] = data_args.test_file
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
    elif data_args.validation_file:
        files["test"] = data_args.validation_file  # the labelled dev file is the test set; dev is held out of train
    return files


def _load_task(data_args: DataArguments) -> tuple[Task, datasets.DatasetDict]:
    if data_args.train_file:
        if data_args.dataset_name:
            raise InputError("give either local files (--train_file) or --dataset_name, not both")
        name = data_args.task_name or Path(data_args.train_file).stem  # --task_name just names a local task
        return load_local(
            _local_files(data_args), data_args.text_column, data_args.label_column, data_args.verbalizer, name
        )
    for flag in ("validation_file", "test_file", "text_column", "label_column"):
        if getattr(data_args, flag):
            raise InputError(f"--{flag} is for local files and needs --train_file")
    task = resolve_task(data_args.task_name, data_args.dataset_name)
    if data_args.verbalizer is not None:
        task = dataclasses.replace(task, verbalizer=tuple(data_args.verbalizer))
    return task, load_registered(task)


def load_data(plan: RunPlan) -> tuple[Task, data_mod.Splits]:
    """The task (registered, or local files) and its splits; data problems are InputErrors, still before weights."""
    data_args = plan.args.data
    task, raw = _load_task(data_args)
    check_task_family(task, plan.family)
    splits = data_mod.make_splits(
        task,
        raw,
        dev_size=data_args.dev_size,
        test_size=data_args.test_size,
        k_shot=data_args.k_shot,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        seed=plan.args.training.seed,
    )
    return task, splits


# --- 3. encoded data: model inputs per split ---------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    tokenizer: Any
    label_ids: list[list[int]] | None  # verbalizer token ids (generative families), else None
    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset


# encoded splits of this process, newest last: the runs of an in-process sweep (methods x learning rates on one
# task and seed) share them instead of tokenizing the same rows again
_ENCODED: collections.OrderedDict[tuple, datasets.Dataset] = collections.OrderedDict()
ENCODED_CACHE_SIZE = 12


def _rows_digest(ds: datasets.Dataset) -> str:
    """A digest of a split's rows (in-memory datasets get a random fingerprint per load, so it cannot serve)."""
    digest = hashlib.sha256()
    for batch in ds.iter(batch_size=4096):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _encode_cached(ds: datasets.Dataset, key: tuple, training: bool, **kw) -> datasets.Dataset:
    full_key = (*key, training, len(ds), _rows_digest(ds))
    if full_key in _ENCODED:
        _ENCODED.move_to_end(full_key)
        return _ENCODED[full_key]
    encoded = data_mod.encode(ds, training=training, **kw)
    _ENCODED[full_key] = encoded
    while len(_ENCODED) > ENCODED_CACHE_SIZE:
        _ENCODED.popitem(last=False)
    return encoded


def encode_data(plan: RunPlan, task: Task, splits: data_mod.Splits) -> Encoded:
    """Tokenized splits; a split this process encoded before with the same tokenizer and length is reused."""
    tokenizer_path = plan.args.model.tokenizer_name or plan.model_path
    tokenizer = load_tokenizer(tokenizer_path)
    label_ids = None if plan.family == ENCODER else data_mod.verbalizer_ids(tokenizer, task, plan.family)
    max_length = plan.args.data.max_seq_length
    kw = dict(task=task, family=plan.family, tokenizer=tokenizer, max_length=max_length, label_ids=label_ids)
    key = (repr(task), str(Path(tokenizer_path).resolve()), plan.family, max_length, repr(label_ids))
    with plan.args.training.main_process_first(desc="tokenizing"):
        train = _encode_cached(splits.train, key, True, **kw)
        dev = _encode_cached(splits.dev, key, False, **kw)
        test = _encode_cached(splits.test, key, False, **kw)
    return Encoded(tokenizer, label_ids, train, dev, test)


# --- 4. model: the pretrained weights with the method applied ----------------------------------------------------
def build_model(plan: RunPlan, task: Task, tokenizer) -> torch.nn.Module:
    """The model, seeded (adapter initialisation depends on it: same seed, same run), with its PEFT method."""
    set_seed(plan.args.training.seed)
    model, fresh_modules = load_model(plan.model_path, plan.family, task, tokenizer)
    if not METHODS[plan.args.method].trains:
        return model.requires_grad_(False)
    if plan.peft_config is None:
        return model
    if fresh_modules:
        logger.warning("the checkpoint has no weights for %s: trained with the head", ", ".join(fresh_modules))
    peft_config = copy.deepcopy(plan.peft_config)
    extra_modules = [*fresh_modules, *(plan.args.model.train_modules or [])]
    if extra_modules:
        peft_config.modules_to_save = [*(peft_config.modules_to_save or []), *extra_modules]
    return get_peft_model(model, peft_config)


def _saved_parameters(folder: Path, skip: tuple[str, ...] = ()) -> int:
    files = sorted(folder.glob("adapter_model*.safetensors")) or sorted(folder.glob("model*.safetensors"))
    total = 0
    for file in files:
        with safe_open(str(file), "pt") as weights:
            shipped = [name for name in weights.keys() if not any(part in name for part in skip)]  # noqa: SIM118
            total += sum(math.prod(weights.get_slice(name).get_shape()) for name in shipped)
    return total


def stored_parameters(model: torch.nn.Module, saved: Path, training_only_keys: tuple[str, ...] = ()) -> int:
    """Parameters a user ships. A prompt method with a stock export ships that: Residual Prompt Tuning's is the
    reparameterised prompt alone, without the MLP that trained it (and that its saved adapter keeps for resuming);
    XPrompt's the pruned prompt. Otherwise the weights saved in `saved` (the adapter, or the whole model; BitFit's
    export is a whole merged model, so its saved adapter is what it ships), less the method's training-only keys
    (UniPELT's prefix MLP: its folded keys/values are saved next to it)."""
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning and exportable(model):
        with tempfile.TemporaryDirectory() as tmp:
            return _saved_parameters(export_adapter(model, Path(tmp) / "export"))
    return _saved_parameters(saved, training_only_keys)


def active_prompt_parameters(model: torch.nn.Module) -> int | None:
    """Non-zero entries of the prompt a prompt method prepends at inference (XPrompt's pruned tokens and pieces are
    zeros, Residual Prompt Tuning's is the reparameterised prompt); None for a method without a soft prompt."""
    if not (isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning):
        return None
    return int(torch.count_nonzero(model.get_prompt_embedding_to_save(model.active_adapter)))


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


# --- 5. trainer --------------------------------------------------------------------------------------------------
def _metrics_fn(task: Task, rows: datasets.Dataset):
    extra: dict[str, Any] = {"groups": rows["group"][:] if task.grouped else None}
    if "candidate" in rows.column_names:
        extra.update(candidates=rows["candidate"][:], answers=rows["answers"][:])

    def compute(prediction) -> dict[str, float]:
        preds = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metrics_mod.compute(task.metrics, preds, prediction.label_ids, regression=task.regression, **extra)

    return compute


def build_trainer(
    plan: RunPlan,
    task: Task,
    splits: data_mod.Splits,
    encoded: Encoded,
    model: torch.nn.Module,
    on_progress: Callable[[RunProgress], None] | None = None,
) -> RunnerTrainer:
    training = plan.args.training
    callbacks = []
    if training.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    trainer = RunnerTrainer(
        model=model,
        args=training,
        train_dataset=encoded.train,
        eval_dataset=encoded.dev,
        processing_class=encoded.tokenizer,
        data_collator=data_mod.Collator(encoded.tokenizer.pad_token_id),
        compute_metrics=_metrics_fn(task, splits.dev),
        callbacks=callbacks,
        family=plan.family,
        label_ids=encoded.label_ids,
        pad_token_id=encoded.tokenizer.pad_token_id,
    )
    trainer.add_callback(ProgressCallback(plan.output_dir, trainer.pop_mean_loss, on_progress))
    return trainer


# --- 6. training -------------------------------------------------------------------------------------------------
def _clear_previous_run(out: Path) -> None:
    """--overwrite_output_dir: drop the old run's results and checkpoints once the new run has started."""
    (out / RESULTS).unlink(missing_ok=True)
    for checkpoint in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(checkpoint, ignore_errors=True)


def train(plan: RunPlan, trainer: RunnerTrainer) -> tuple[Any, float]:
    """Train (the method's own procedure if it has one, resuming from the planned checkpoint); (TrainOutput, s)."""
    if plan.args.training.overwrite_output_dir and trainer.is_world_process_zero():
        _clear_previous_run(plan.output_dir)
    if plan.resume:
        logger.warning("resuming from %s", plan.resume)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # a Ray worker or an in-process sweep trains several runs in turn
    started = time.perf_counter()
    method_train = METHODS[plan.args.method].train
    if not METHODS[plan.args.method].trains:
        output = TrainOutput(global_step=0, training_loss=0.0, metrics={})
    elif method_train is not None:
        output = method_train(trainer, plan.resume, train_options(plan.args.method, plan.args.method_options))
    else:
        output = trainer.train(resume_from_checkpoint=plan.resume)
    return output, time.perf_counter() - started


# --- 7. results: dev/test evaluation, the saved adapter, results.json --------------------------------------------
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


def _write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def finish(
    plan: RunPlan,
    task: Task,
    splits: data_mod.Splits,
    encoded: Encoded,
    trainer: RunnerTrainer,
    trained: tuple[Any, float],
    launch: Mapping[str, str],
) -> dict[str, Any]:
    """Evaluate on dev and test, save the adapter (or model), write results.json (main process); the results."""
    args, (train_output, train_time) = plan.args, trained
    trainer.compute_metrics = _metrics_fn(task, splits.dev)
    dev_metrics = trainer.evaluate(encoded.dev, metric_key_prefix="dev")
    trainer.compute_metrics = _metrics_fn(task, splits.test)
    test_metrics = trainer.evaluate(encoded.test, metric_key_prefix="test")
    trainable, total = parameter_counts(trainer.model)
    stored = 0
    if METHODS[args.method].trains:  # the zero-shot baseline is the pretrained model: nothing of its own to save
        trainer.save_model(str(plan.output_dir))
        stored = stored_parameters(trainer.model, plan.output_dir, METHODS[args.method].training_only_keys)
    peak, memory_kind = _peak_memory_mb()

    def strip(metrics: dict, prefix: str) -> dict:
        keep = (*task.metrics, "score", "loss")
        return {name: metrics[f"{prefix}_{name}"] for name in keep if f"{prefix}_{name}" in metrics}

    results = {
        "task": task.name,
        "dataset": task.dataset,
        "method": args.method,
        "peft_type": args.method,
        "model": args.model.model_name_or_path,
        "model_path": plan.model_path,
        "model_type": plan.model_type,
        "family": plan.family,
        "task_type": TASK_TYPES[plan.family],
        "metrics": list(task.metrics),
        "seed": args.training.seed,
        "learning_rate": args.training.learning_rate,
        "k_shot": args.data.k_shot,
        "method_options": args.method_options,
        "recipe": {
            "taken": args.recipe,  # the recipe arguments this run took (the others the user set)
            "source": METHODS[args.method].recipe_for(plan.family).source,
        },
        "hyperparameters": hyperparameters(args.model, args.data, args.peft, args.training),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": 100.0 * trainable / total,
        "stored_params": stored,  # in the exported adapter, else the saved adapter (or model)
        "stored_percent": 100.0 * stored / total,
        "active_prompt_params": active_prompt_parameters(trainer.model),
        "num_examples": {"train": len(encoded.train), "dev": len(encoded.dev), "test": len(encoded.test)},
        "dev": strip(dev_metrics, "dev"),
        "test": strip(test_metrics, "test"),
        "train_loss": train_output.training_loss,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": plan.resume,
        "train_time_s": train_time,
        "peak_memory_mb": peak,
        "memory_kind": memory_kind,
        "world_size": args.training.world_size,
        "rank_checksums": _rank_checksums(trainer.model),
        "peftlab_version": peftlab.__version__,
        **launch,
    }
    if trainer.is_world_process_zero():
        _write_json_atomically(plan.output_dir / RESULTS, results)
    return results


# --- the Trainer and its exact checkpoints ----------------------------------------------------------------------------
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
        self._losses: list[float] = []
        # a decoder's training rows carry loss on the answer's tokens only: project just their predictors onto the
        # vocabulary (`data.answer_positions`); the same loss as the model's own, reduced the same way
        self._answer_logits_only = (
            family == DECODER and self.compute_loss_func is None and data_mod.accepts_logits_to_keep(self.model)
        )
        if self._answer_logits_only:
            self.compute_loss_func = self._answer_loss

    def pop_mean_loss(self) -> float | None:
        """The mean training loss of the steps since the last call (for the progress line)."""
        losses, self._losses = self._losses, []
        return sum(losses) / len(losses) if losses else None

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

    # Upstream gap: with train_sampling_strategy group_by_length, Trainer evaluates in length order too, but
    # compute_metrics gets no row ids: MultiRC's and ReCoRD's metrics read each row's question by position.
    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length" or eval_dataset is None:
            return super()._get_eval_sampler(eval_dataset)
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None  # None: sharded in row order

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._answer_logits_only and "labels" in inputs:
            inputs = {**inputs, "logits_to_keep": data_mod.answer_positions(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _answer_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Trainer's `compute_loss_func`: the causal-LM loss of the kept logits (label smoothing as Trainer's)."""
        targets = data_mod.answer_targets(labels, data_mod.answer_positions(labels))
        logits = outputs["logits"]
        if self.label_smoother is not None:
            return self.label_smoother({"logits": logits}, targets, num_items_in_batch=num_items_in_batch)
        return ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch, shift_labels=targets)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(float(not torch.isfinite(loss).all()), device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every rank stops together, none waits on a collective forever
        if not bad.item():
            self._losses.append(float(loss))
        else:
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

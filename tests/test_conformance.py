"""The conformance matrix: every check (a test function below, written once) on every row of conformance_cases.ROWS
(method x model family x task type) it applies to.

Shared state keeps it fast: each base model is built once per worker, each row is trained once (`runs`) for the
checks that only read the trained model, and the fresh-process loads of all rows run in two child processes per
session, whatever the number of xdist workers (one with peftlab for `save_pretrained` round trips, one without it
for exports).
"""

from __future__ import annotations

import copy
import math
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conformance_cases import (
    CHECKS,
    EXPORT_ATOL,
    KNOWN_FAILURES,
    REFUSALS,
    ROWS,
    SLOW,
    Row,
    applies,
    cells,
    export_refusal,
)
from datasets import Dataset
from filelock import FileLock
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from tiny import (
    AUTO_MODEL,
    GENERATIVE,
    NUM_LABELS,
    VOCAB,
    assert_same_outputs,
    load_base,
    loss_of,
    make_batch,
    model_inputs,
    outputs_in_one_fresh_process,
    outputs_of,
    save_tiny_base,
    train_steps,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BitsAndBytesConfig, PreTrainedTokenizerFast, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss
from trl import SFTConfig, SFTTrainer

import peftlab
from peftlab.runner import data as data_mod
from peftlab.xprompt import importance_scores, prune


class Bases:
    """Each (family, task type) base model built once: saved to disk (child processes load it by path) and kept in
    memory, each cell getting its own deep copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[str, str, int], tuple[Path, torch.nn.Module]] = {}

    def _get(self, family: str, task_type: str, hidden_size: int = 32) -> tuple[Path, torch.nn.Module]:
        key = (family, task_type, hidden_size)
        if key not in self._built:
            path = save_tiny_base(self.root, task_type, family, hidden_size=hidden_size)
            self._built[key] = (path, load_base(path, task_type))
        return self._built[key]

    def path(self, row: Row, hidden_size: int = 32) -> Path:
        return self._get(row.family, row.task_type, hidden_size)[0]

    def model(self, row: Row) -> torch.nn.Module:
        return copy.deepcopy(self._get(row.family, row.task_type)[1])


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("bases"))


def prune_prompt(model: PeftModel, batch: dict) -> None:
    """XPrompt stage 1 in brief, then a third of the tokens and a quarter of the surviving pieces pruned."""
    train_steps(model, batch, steps=2)
    prune(model, importance_scores(model, [batch]), token_ratio=0.34, piece_ratio=0.25)


def build(row: Row, base: torch.nn.Module, seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(base, row.config())
    if row.pruned:
        prune_prompt(model, make_batch(row.task_type))
    return model


@torch.no_grad()
def eval_loss(model, batch: dict) -> float:
    model.eval()
    return loss_of(model(**batch)).item()


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, by name."""
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_only_adapter_changed(model, before: dict[str, torch.Tensor], row: Row, every: bool = True) -> None:
    """Frozen tensors (the base model's weights, every buffer) are bit-identical; every trainable one changed (or,
    `every=False`, some), except a BERT pooler on feature extraction, which the training loss does not reach."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    changed = {name for name, t in snapshot(model).items() if not torch.equal(t, before[name])}
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)}"
    unreached = {n for n in trainable if row.task_type == "FEATURE_EXTRACTION" and ".pooler." in n}
    assert trainable - unreached, "nothing is trainable"
    if every:
        assert trainable - unreached <= changed, f"trainable tensors that did not change: {sorted(trainable - changed)}"
    assert changed, "no trainable tensor changed"


def differ(outputs: dict, others: dict) -> bool:
    """The main outputs differ, on the positions both have (a prompt method's logits also cover its virtual tokens,
    which come first)."""
    a, b = (next(v for k, v in out.items() if k != "generated") for out in (outputs, others))
    if a.dim() >= 2 and a.shape[1] != b.shape[1]:  # QA's start logits are 2-D
        length = min(a.shape[1], b.shape[1])
        a, b = a[:, -length:], b[:, -length:]
    return not torch.allclose(a, b)


def raise_child_error(result: dict) -> None:
    if "error" in result:
        raise AssertionError(f"the fresh process failed:\n{result['error'][-3000:]}")


# --- shared state: each row trained once, saved, reloaded and exported in fresh processes ----------------------------
@dataclass
class Run:
    model: PeftModel
    batch: dict
    adapter: Path
    losses: list[float]  # eval-mode loss before and after training
    before: dict[str, torch.Tensor]
    expected: dict = field(default_factory=dict)


class Runs:
    """Each row trained a few steps and saved, on first use; a row whose training raised re-raises in every cell."""

    def __init__(self, bases: Bases, root: Path) -> None:
        self.bases, self.root = bases, root
        self._runs: dict[str, Run | Exception] = {}

    def _train(self, row: Row) -> Run:
        model = build(row, self.bases.model(row))
        batch = make_batch(row.task_type)
        before = snapshot(model)
        # eval-mode losses before and after: the training losses carry dropout noise (BART's prompt rows rise in it)
        losses = [eval_loss(model, batch)]
        train_steps(model, batch, steps=5)
        losses.append(eval_loss(model, batch))
        adapter = self.root / row.id
        model.save_pretrained(adapter)
        return Run(model, batch, adapter, losses, before, outputs_of(model, row.task_type, batch))

    def __getitem__(self, row: Row) -> Run:
        if row.id not in self._runs:
            try:
                self._runs[row.id] = self._train(row)
            except Exception as error:  # noqa: BLE001  (kept, so that each cell of the row reports it)
                self._runs[row.id] = error
        run = self._runs[row.id]
        if isinstance(run, Exception):
            raise run
        return run


@pytest.fixture(scope="session")
def runs(bases, tmp_path_factory) -> Runs:
    return Runs(bases, tmp_path_factory.mktemp("runs"))


def _trained(runs: Runs, rows: list[Row]) -> dict[Row, Run]:
    trained = {}
    for row in rows:
        try:
            trained[row] = runs[row]
        except Exception:  # noqa: BLE001  (that row's own cells report it)
            continue
    return trained


def computed_once(tmp_path_factory, name: str, compute) -> dict:
    """`compute(folder)` run by ONE pytest-xdist worker (the first to ask), its result shared with the others.

    The fresh-process loads are what costs (an interpreter start each); the rows are trained deterministically, so
    another worker's own training of a row gives the very outputs the loads are compared with.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, above each worker's own
    folder, result = root / name, root / f"{name}.pt"
    with FileLock(str(root / f"{name}.lock")):
        if not result.is_file():
            folder.mkdir(exist_ok=True)  # a worker whose compute raised may have left it
            torch.save(compute(folder), result)
    return torch.load(result)


@pytest.fixture(scope="session")
def reloaded(runs, bases, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every row's adapter loaded with PeftModel.from_pretrained and AutoPeftModelFor*, all in ONE new process."""

    def compute(folder: Path) -> dict:
        trained = _trained(runs, [row for row in ROWS if applies(row, "reload")])
        jobs, keys = [], []
        for row, run in trained.items():
            for loader in ("peft", "auto"):
                jobs.append(
                    {
                        "task_type": row.task_type,
                        "batch": run.batch,
                        "adapter": run.adapter,
                        "base": bases.path(row),
                        "loader": loader,
                    }
                )
                keys.append((row.id, loader))
        return dict(zip(keys, outputs_in_one_fresh_process(folder, jobs, catch_errors=True), strict=True))

    return computed_once(tmp_path_factory, "reloaded", compute)


@pytest.fixture(scope="session")
def exported(runs, bases, tmp_path_factory) -> dict[str, dict]:
    """Every row exported with peftlab.export_adapter (or its refusal: {"refused": message}), then loaded in ONE
    process without peftlab: a merged model with transformers, an adapter with stock PeftModel.from_pretrained."""

    def compute(folder: Path) -> dict:
        results, jobs, keys = {}, [], []
        for row, run in _trained(runs, [row for row in ROWS if applies(row, "export")]).items():
            try:
                path = peftlab.export_adapter(run.model, folder / row.id)
            except ValueError as error:  # the cell checks whether this refusal is the documented one
                results[row.id] = {"refused": str(error)}
                continue
            except Exception:  # noqa: BLE001  (that row's cell reports it)
                results[row.id] = {"error": traceback.format_exc()}
                continue
            job = {"task_type": row.task_type, "batch": run.batch, "adapter": path, "loader": "transformers"}
            if (path / "adapter_config.json").is_file():
                job.update(loader="peft", base=bases.path(row))
            jobs.append(job)
            keys.append(row.id)
        outputs = outputs_in_one_fresh_process(folder, jobs, import_peftlab=False, catch_errors=True) if jobs else []
        results.update(zip(keys, outputs, strict=True))
        return results

    return computed_once(tmp_path_factory, "exported", compute)


# --- the checks ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", cells("train"))
def test_train(runs, row):
    """A few steps: the (eval-mode) loss falls, only the adapter's tensors change, the base stays bit-identical."""
    run = runs[row]
    assert run.losses[-1] < run.losses[0], run.losses
    assert_only_adapter_changed(run.model, run.before, row)


@pytest.mark.parametrize("row", cells("reload"))
def test_reload(runs, reloaded, row):
    """save_pretrained, then PeftModel.from_pretrained and AutoPeftModelFor* in a fresh process: identical outputs
    and greedy generations."""
    run = runs[row]
    for loader in ("peft", "auto"):
        raise_child_error(reloaded[row.id, loader])
        assert_same_outputs(run.expected, reloaded[row.id, loader])


@pytest.mark.parametrize("row", cells("disable"))
def test_disable(runs, bases, row):
    """disable_adapter() gives the base model's outputs and generations, with and without the KV cache."""
    run = runs[row]
    base = bases.model(row)
    assert differ(run.expected, outputs_of(base, row.task_type, run.batch))
    for use_cache in (True, False) if row.task_type in GENERATIVE else (True,):
        expected = outputs_of(base, row.task_type, run.batch, use_cache=use_cache)
        with run.model.disable_adapter():
            disabled = outputs_of(run.model, row.task_type, run.batch, use_cache=use_cache)
        assert_same_outputs(expected, disabled)
    assert_same_outputs(run.expected, outputs_of(run.model, row.task_type, run.batch))  # enabled again


@pytest.mark.parametrize("row", cells("answer_logits"))
def test_answer_logits(runs, row):
    """The runner's decoder loss projects only the answer's predictors onto the vocabulary (`logits_to_keep`, counted
    from the end so that prepended virtual tokens do not shift them): the same loss and gradients as full logits."""
    model = runs[row].model.eval()
    inputs = model_inputs(runs[row].batch)
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, n in enumerate(inputs["attention_mask"].sum(1).tolist()):  # the answer: each row's last two tokens
        labels[i, n - 2 : n] = inputs["input_ids"][i, n - 2 : n]

    def loss_and_grads(loss_of_model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = loss_of_model()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values())), strict=True))

    def answer_only() -> torch.Tensor:
        positions = data_mod.answer_positions(labels)
        logits = model(**inputs, logits_to_keep=positions).logits
        assert logits.shape[1] == len(positions) < labels.shape[1] - 1
        targets = data_mod.answer_targets(labels, positions)
        return ForCausalLMLoss(logits, None, logits.shape[-1], shift_labels=targets)

    full_loss, full_grads = loss_and_grads(lambda: model(**inputs, labels=labels).loss)
    loss, grads = loss_and_grads(answer_only)
    torch.testing.assert_close(loss, full_loss)
    torch.testing.assert_close(grads, full_grads)


@pytest.mark.parametrize("row", cells("cache"))
def test_cache(runs, row):
    """With the adapter active, greedy generation is the same with and without the KV cache: the cached steps must
    neither drop the prompt nor inject it again (peft 0.21.2 under transformers' `cache` rename did)."""
    run = runs[row]
    cached = outputs_of(run.model, row.task_type, run.batch, use_cache=True)
    uncached = outputs_of(run.model, row.task_type, run.batch, use_cache=False)
    assert torch.equal(cached["generated"], uncached["generated"]), (cached["generated"], uncached["generated"])


@pytest.mark.parametrize("row", cells("adapters"))
def test_adapters(runs, row):
    """add_adapter, set_adapter (the outputs switch, and come back exactly), delete_adapter."""
    run = runs[row]
    model = copy.deepcopy(run.model)
    model.add_adapter("other", row.config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the new adapter's own values (many start as an identity)
        for name, p in model.named_parameters():
            if "other" in name.split("."):
                p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.set_adapter("other")
    other = outputs_of(model, row.task_type, run.batch)
    assert differ(other, run.expected)
    model.set_adapter("default")
    assert_same_outputs(run.expected, outputs_of(model, row.task_type, run.batch))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not [name for name, _ in model.named_parameters() if "other" in name.split(".")]
    assert_same_outputs(run.expected, outputs_of(model, row.task_type, run.batch))


@pytest.mark.parametrize("row", cells("checkpointing"))
def test_checkpointing(bases, row):
    """Gradient checkpointing, reentrant and not: the same loss and gradients as without."""
    batch = make_batch(row.task_type)
    results = []
    for reentrant in (None, True, False):
        base = bases.model(row)
        if reentrant is not None:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model = build(row, base)
        model.train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == (reentrant is not None)
        torch.manual_seed(1)
        loss = loss_of(model(**batch))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        results.append((loss.detach(), grads))
    (loss, grads), *checkpointed = results
    assert any(g.abs().sum() > 0 for g in grads.values())
    for other_loss, other_grads in checkpointed:
        torch.testing.assert_close(other_loss, loss, atol=1e-6, rtol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("row", cells("bf16"))
def test_bf16(bases, row):
    """A bfloat16 base model trains: finite losses, the adapter's tensors update and the outputs move. (Not the loss
    itself: bf16 resolves 1/64 near 4.5, below what a few steps of a prompt on a random BART change.)"""
    model = build(row, bases.model(row).to(torch.bfloat16))
    batch = make_batch(row.task_type)
    before, outputs_before = snapshot(model), outputs_of(model, row.task_type, batch)
    losses = train_steps(model, batch, steps=3)
    assert all(math.isfinite(x) for x in losses), losses
    assert_only_adapter_changed(model, before, row)
    assert differ(outputs_of(model, row.task_type, batch), outputs_before)


def load_4bit(bases: Bases, row: Row) -> torch.nn.Module:
    # the heads stay unquantized, as transformers' own default does: a classifier is trained in full, and an LM head
    # tied to the input embeddings (GPT-2, T5, BART) cannot be a 4-bit layer (giving the list replaces that default)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier", "lm_head"]
    )
    path = bases.path(row, hidden_size=64)  # see tiny.tiny_config
    return AUTO_MODEL[row.task_type].from_pretrained(path, quantization_config=quantization)


@pytest.mark.parametrize("row", cells("kbit"))
def test_kbit(bases, row, tmp_path):
    """A 4-bit bitsandbytes base (peft.prepare_model_for_kbit_training) trains, saves and reloads identically."""
    model = build(row, prepare_model_for_kbit_training(load_4bit(bases, row)))
    batch = make_batch(row.task_type)
    before = snapshot(model)
    losses = train_steps(model, batch, steps=3)
    assert all(math.isfinite(x) for x in losses) and losses[-1] != losses[0], losses
    assert_only_adapter_changed(model, before, row)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(bases, row), tmp_path / "adapter")
    assert_same_outputs(outputs_of(model, row.task_type, batch), outputs_of(reloaded, row.task_type, batch))


def resume_examples(task_type: str, count: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(count):
        input_ids = torch.randint(2, VOCAB, (10,), generator=g)
        example = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if task_type == "SEQ_CLS":
            example["labels"] = torch.randint(0, NUM_LABELS, (), generator=g)
        elif task_type == "CAUSAL_LM":
            example["labels"] = input_ids.clone()
        else:
            example["labels"] = torch.randint(2, VOCAB, (5,), generator=g)
        examples.append(example)
    return examples


@pytest.mark.parametrize("row", cells("resume"))
def test_resume(bases, row, tmp_path):
    """Stock transformers.Trainer resumed from a mid-run checkpoint ends bit-identical to the uninterrupted run."""
    data = resume_examples(row.task_type)

    def trainer(output_dir: Path, seed: int) -> Trainer:
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            seed=0,
            use_cpu=True,
            report_to=[],
            logging_steps=100,
            disable_tqdm=True,
        )
        return Trainer(model=build(row, bases.model(row), seed=seed), args=args, train_dataset=data)

    uninterrupted = trainer(tmp_path / "full", seed=0)
    uninterrupted.train()
    resumed = trainer(tmp_path / "resumed", seed=1)  # another init: everything must come from the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    want, got = snapshot(uninterrupted.model), snapshot(resumed.model)
    assert want.keys() == got.keys()
    assert not [name for name in want if not torch.equal(want[name], got[name])]


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace tokenizer over the tiny vocabulary: [PAD] = 0, </s> = 1 (the tiny models' ids), then w2..w95."""
    vocab = {"[PAD]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>", unk_token="[PAD]")


@pytest.mark.parametrize("row", cells("trl"))
def test_trl(bases, row, word_tokenizer, tmp_path):
    """TRL SFTTrainer(peft_config=...) trains, saves, and the saved adapter reloads with identical outputs."""
    g = torch.Generator().manual_seed(4)
    texts = [" ".join(f"w{i}" for i in torch.randint(2, VOCAB, (9,), generator=g).tolist()) for _ in range(8)]
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's default where bf16 is supported: the reloaded model would run without its autocast
        disable_tqdm=True,
    )
    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=bases.model(row),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=word_tokenizer,
        peft_config=row.config(),
    )
    batch = make_batch(row.task_type)
    if row.pruned:
        prune_prompt(trainer.model, batch)
    before = snapshot(trainer.model)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), trainer.state.log_history
    # not every tensor: on TRL's texts all ReLU units of one UniPELT-AP adapter stay off (its zero-initialised
    # up-projection then gives its down-projection no gradient); check 1 covers every tensor on its batch
    assert_only_adapter_changed(trainer.model, before, row, every=False)
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(bases.model(row), tmp_path / "adapter")
    assert_same_outputs(outputs_of(trainer.model, row.task_type, batch), outputs_of(reloaded, row.task_type, batch))


@pytest.mark.parametrize("row", cells("export"))
def test_export(runs, exported, row):
    """peftlab.export_adapter: the stock form loads in a fresh process without peftlab and matches; a method or
    family with no stock form is refused with the documented message."""
    run = runs[row]
    result = exported[row.id]
    refusal = export_refusal(row)
    if refusal:
        assert refusal in result.get("refused", ""), result
        return
    assert "refused" not in result, result["refused"]
    raise_child_error(result)
    assert_same_outputs(run.expected, result, atol=EXPORT_ATOL.get(row.method, 0.0))


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.id for r in REFUSALS])
def test_unsupported_configuration_is_refused(bases, refusal):
    base = bases.model(Row("lora", refusal.family, refusal.task_type))
    with pytest.raises(ValueError, match=refusal.match):
        get_peft_model(base, refusal.config())


def test_the_table_names_real_cells():
    """Every known failure and slow mark names a cell of the matrix (a stale entry would silently mark nothing)."""
    cells_ = {(row.id, check) for row in ROWS for check in CHECKS if applies(row, check)}
    assert not (set(KNOWN_FAILURES) | SLOW) - cells_
    assert len({row.id for row in ROWS}) == len(ROWS)

"""Residual Prompt Tuning beyond the conformance matrix: trainable tensors, exported files, encoder options."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import (
    TASK_FAMILIES,
    assert_same_outputs,
    load_base,
    loss_of,
    make_batch,
    outputs_in_one_fresh_process,
    outputs_of,
    save_tiny_base,
    train_steps,
)

import peftlab
from peftlab import ResidualPromptTuningConfig
from peftlab.methods.residual_prompt_tuning.encoder import TRAINING_STATE_PREFIX

N_TOKENS = 4
SMALL = {"num_virtual_tokens": N_TOKENS, "encoder_bottleneck_size": 16}
HEADS = {"SEQ_CLS": "classifier", "TOKEN_CLS": "classifier", "QUESTION_ANS": "qa_outputs"}
# every (task type, family), plus one run of the non-default encoder options through the whole round trip
CASES = {f"{task}-{family}": (task, family, {}) for task, family in TASK_FAMILIES}
SEPARATE = "SEQ_CLS-bert-separate"  # the conformance matrix reloads the defaults' cases, not this one
CASES[SEPARATE] = (
    "SEQ_CLS",
    "bert",
    {"encoder_separate": True, "encoder_layer_norm": True, "encoder_nonlinearity": "tanh", "encoder_dropout": 0.1},
)


@torch.no_grad()
def eval_loss(model, batch) -> float:
    model.eval()
    return loss_of(model(**batch)).item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Train, save and export every case in this process, then reload in two fresh processes: the options case in
    one that imports peftlab (PeftModel.from_pretrained and AutoPeftModelFor*), every export in one that never does."""
    root = tmp_path_factory.mktemp("rpt")
    records, with_peftlab, stock_only = {}, [], []
    for case, (task, family, options) in CASES.items():
        torch.manual_seed(0)
        base = save_tiny_base(root, task, family)
        model = get_peft_model(load_base(base, task), ResidualPromptTuningConfig(task_type=task, **SMALL, **options))
        batch = make_batch(task)
        before_params, before_loss = snapshot(model), eval_loss(model, batch)
        train_steps(model, batch, steps=5)
        after_loss = eval_loss(model, batch)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_params[n])}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = outputs_of(model, task, batch)
        model.save_pretrained(root / f"adapter-{case}")
        peftlab.export_adapter(model, root / f"export-{case}")
        records[case] = {
            "task": task,
            "before": before_loss,
            "after": after_loss,
            "changed": changed,
            "trainable": trainable,
            "expected": expected,
            "root": root,
        }
        if case == SEPARATE:
            with_peftlab += [
                {"task_type": task, "batch": batch, "adapter": root / f"adapter-{case}", "base": base},
                {"task_type": task, "batch": batch, "adapter": root / f"adapter-{case}", "loader": "auto"},
            ]
        stock_only.append({"task_type": task, "batch": batch, "adapter": root / f"export-{case}", "base": base})
    loaded = outputs_in_one_fresh_process(root, with_peftlab)
    exported = outputs_in_one_fresh_process(root, stock_only, import_peftlab=False)
    records[SEPARATE]["peft"], records[SEPARATE]["auto"] = loaded
    for index, case in enumerate(CASES):
        records[case]["stock"] = exported[index]
    return records


@pytest.mark.parametrize("case", list(CASES))
def test_training_changes_only_prompt_mlp_and_head(round_trips, case):
    """Beyond the matrix's train check: WHICH tensors train (the prompt embedding and MLP, the head copy)."""
    record = round_trips[case]
    assert record["after"] < record["before"]
    encoder = {n for n in record["trainable"] if ".prompt_encoder." in n or n.startswith("prompt_encoder.")}
    head = record["trainable"] - encoder
    assert any(".mlp." in n for n in encoder) and any("embedding.weight" in n for n in encoder)
    if record["task"] in HEADS:
        assert head and all(HEADS[record["task"]] in n and "modules_to_save" in n for n in head)
    else:
        assert not head
    # everything trainable moved, nothing else did
    assert record["changed"] == record["trainable"]


def test_fresh_process_reload_of_the_options_case_is_identical(round_trips):
    record = round_trips[SEPARATE]
    assert_same_outputs(record["expected"], record["peft"])
    assert_same_outputs(record["expected"], record["auto"])


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_stock_peft_without_peftlab(round_trips, case):
    """Beyond the matrix's export check: the files (stock config fields, only the prompt, no training state)."""
    record = round_trips[case]
    assert_same_outputs(record["expected"], record["stock"])
    folder = record["root"] / f"export-{case}"
    config = json.loads((folder / "adapter_config.json").read_text())
    saved = json.loads((record["root"] / f"adapter-{case}" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and saved["peft_type"] == "RESIDUAL_PROMPT_TUNING"
    for key in ("num_virtual_tokens", "num_transformer_submodules", "task_type", "base_model_name_or_path"):
        assert config[key] == saved[key], key
    weights = load_file(folder / "adapter_model.safetensors")
    full = load_file(record["root"] / f"adapter-{case}" / "adapter_model.safetensors")
    assert "prompt_embeddings" in weights and not any(k.startswith(TRAINING_STATE_PREFIX) for k in weights)
    assert weights.keys() == {k for k in full if not k.startswith(TRAINING_STATE_PREFIX)}
    assert torch.equal(weights["prompt_embeddings"], full["prompt_embeddings"])


def test_saved_prompt_is_reparameterized_and_loaded_model_has_no_mlp(tmp_path):
    base = save_tiny_base(tmp_path, "SEQ_CLS", "bert")
    model = get_peft_model(load_base(base, "SEQ_CLS"), ResidualPromptTuningConfig(task_type="SEQ_CLS", **SMALL))
    encoder = model.prompt_encoder["default"]
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    with torch.no_grad():
        reparameterized = encoder.mlp(encoder.embedding.weight)
    torch.testing.assert_close(saved["prompt_embeddings"], reparameterized, rtol=0, atol=0)
    assert not torch.allclose(reparameterized, encoder.embedding.weight)  # standard init: P' != P at step 0
    assert torch.equal(saved[TRAINING_STATE_PREFIX + "embedding.weight"], encoder.embedding.weight)

    loaded = PeftModel.from_pretrained(load_base(base, "SEQ_CLS"), tmp_path / "adapter")
    loaded_encoder = loaded.prompt_encoder["default"]
    assert loaded_encoder.mlp is None
    assert sum(p.numel() for p in loaded_encoder.parameters()) == N_TOKENS * 32
    assert torch.equal(loaded_encoder.embedding.weight, saved["prompt_embeddings"])
    # exporting the loaded (inference-mode) model gives the same files as exporting the trained one
    peftlab.export_adapter(model, tmp_path / "export-trained")
    peftlab.export_adapter(loaded, tmp_path / "export-loaded")
    trained_files = load_file(tmp_path / "export-trained" / "adapter_model.safetensors")
    loaded_files = load_file(tmp_path / "export-loaded" / "adapter_model.safetensors")
    assert trained_files.keys() == loaded_files.keys()
    assert all(torch.equal(trained_files[k], loaded_files[k]) for k in trained_files)


def test_dropout_does_not_leak_into_the_saved_prompt(tmp_path):
    base = save_tiny_base(tmp_path, "SEQ_CLS", "bert")
    config = ResidualPromptTuningConfig(task_type="SEQ_CLS", encoder_dropout=0.5, **SMALL)
    model = get_peft_model(load_base(base, "SEQ_CLS"), config).train()
    encoder = model.prompt_encoder["default"]
    first = encoder.adapter_state_dict()["prompt_embeddings"]
    second = encoder.adapter_state_dict()["prompt_embeddings"]
    assert torch.equal(first, second) and encoder.training
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(first, encoder.reparameterized_prompt(), rtol=0, atol=0)


def test_mlp_runs_once_on_the_unbatched_prompt(tmp_path):
    base = save_tiny_base(tmp_path, "CAUSAL_LM", "gpt2")
    model = get_peft_model(load_base(base, "CAUSAL_LM"), ResidualPromptTuningConfig(task_type="CAUSAL_LM", **SMALL))
    inputs = []
    model.prompt_encoder["default"].mlp.register_forward_hook(lambda module, args, out: inputs.append(args[0].shape))
    batch = make_batch("CAUSAL_LM", batch_size=6)
    loss_of(model(**batch)).backward()
    assert inputs == [torch.Size([N_TOKENS, 32])]


def test_seq2seq_prompt_goes_to_the_encoder_only(tmp_path):
    base = save_tiny_base(tmp_path, "SEQ_2_SEQ_LM", "t5")
    config = ResidualPromptTuningConfig(task_type="SEQ_2_SEQ_LM", **SMALL)
    model = get_peft_model(load_base(base, "SEQ_2_SEQ_LM"), config)
    assert model.peft_config["default"].num_transformer_submodules == 1
    assert model.prompt_tokens["default"].numel() == N_TOKENS
    batch = make_batch("SEQ_2_SEQ_LM")
    encoder_lengths = []
    model.get_base_model().encoder.register_forward_hook(
        lambda module, args, out: encoder_lengths.append(out.last_hidden_state.shape[1])
    )
    out = model(**batch)
    assert encoder_lengths == [N_TOKENS + batch["input_ids"].shape[1]]
    assert out.logits.shape[1] == batch["labels"].shape[1]  # the decoder sees no prompt


def test_token_classification_loss_ignores_the_virtual_positions(tmp_path):
    base = save_tiny_base(tmp_path, "TOKEN_CLS", "bert")
    model = get_peft_model(load_base(base, "TOKEN_CLS"), ResidualPromptTuningConfig(task_type="TOKEN_CLS", **SMALL))
    model.eval()
    batch = make_batch("TOKEN_CLS")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == N_TOKENS + batch["input_ids"].shape[1]
    logits = out.logits[:, N_TOKENS:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_question_answering_loss_uses_shifted_positions(tmp_path):
    base = save_tiny_base(tmp_path, "QUESTION_ANS", "bert")
    model = get_peft_model(
        load_base(base, "QUESTION_ANS"), ResidualPromptTuningConfig(task_type="QUESTION_ANS", **SMALL)
    ).eval()
    batch = make_batch("QUESTION_ANS")
    with torch.no_grad():
        out = model(**batch)
    ce = torch.nn.functional.cross_entropy
    # the logits keep the virtual positions first (stock layout); the targets must point past them
    manual = (
        ce(out.start_logits, batch["start_positions"] + N_TOKENS)
        + ce(out.end_logits, batch["end_positions"] + N_TOKENS)
    ) / 2
    unshifted = (ce(out.start_logits, batch["start_positions"]) + ce(out.end_logits, batch["end_positions"])) / 2
    torch.testing.assert_close(out.loss, manual)
    assert not torch.allclose(out.loss, unshifted)

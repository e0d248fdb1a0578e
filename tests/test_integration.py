"""The compatibility patches leave stock PEFT methods exactly as they were."""

import pytest
import torch
from peft import PeftModelForSeq2SeqLM, PeftModelForTokenClassification, PromptTuningConfig, get_peft_model
from peft.peft_model import PeftModelForQuestionAnswering
from tiny import assert_same_outputs, load_base, make_batch, model_inputs, outputs_of, save_tiny_base

import peftlab  # noqa: F401


@pytest.mark.parametrize(
    ("task_type", "family", "patched_cls"),
    [
        ("SEQ_2_SEQ_LM", "t5", PeftModelForSeq2SeqLM),
        ("TOKEN_CLS", "bert", PeftModelForTokenClassification),
        ("QUESTION_ANS", "bert", PeftModelForQuestionAnswering),
    ],
)
def test_stock_prompt_tuning_passes_through_patched_forward(tmp_path, task_type, family, patched_cls):
    model = get_peft_model(
        load_base(save_tiny_base(tmp_path, task_type, family), task_type),
        PromptTuningConfig(task_type=task_type, num_virtual_tokens=4),
    ).eval()
    batch = make_batch(task_type)
    if task_type == "TOKEN_CLS":  # stock PEFT does not pad token labels for the prompt: compare logits only
        batch = model_inputs(batch)
    name = "start_logits" if task_type == "QUESTION_ANS" else "logits"
    with torch.no_grad():
        patched = getattr(model(**batch), name)
        stock = getattr(patched_cls.forward.__wrapped__(model, **batch), name)
    torch.testing.assert_close(patched, stock, rtol=0, atol=0)


def test_stock_seq2seq_prompt_tuning_generate_unchanged(tmp_path):
    model = get_peft_model(
        load_base(save_tiny_base(tmp_path, "SEQ_2_SEQ_LM", "t5"), "SEQ_2_SEQ_LM"),
        PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
    ).eval()
    inputs = model_inputs(make_batch("SEQ_2_SEQ_LM"))
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    patched = model.generate(**inputs, **kwargs)
    stock = PeftModelForSeq2SeqLM.generate.__wrapped__(model, **inputs, **kwargs)
    assert torch.equal(patched, stock)


def test_a_failed_write_leaves_the_destination_as_it_was(tmp_path):
    from peftlab.staging import staged_folder

    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "kept.txt").write_text("earlier run")
    with pytest.raises(RuntimeError), staged_folder(destination) as staging:
        (staging / "half.txt").write_text("partial")
        raise RuntimeError("export failed midway")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in destination.iterdir()] == ["kept.txt"]
    with staged_folder(destination) as staging:
        (staging / "new.txt").write_text("complete")
    assert [p.name for p in destination.iterdir()] == ["new.txt"]


@pytest.mark.parametrize(("task_type", "family"), [("SEQ_CLS", "bert"), ("SEQ_2_SEQ_LM", "t5")])
def test_stock_prompt_tuning_disable_adapter_gives_the_base_model(tmp_path, task_type, family):
    """Stock PEFT fails here (BERT: no prepare_inputs_for_generation) or keeps the trained head / the seq2seq prompt
    in generate; after `import peftlab` the disabled model is the base model, and the head's trainability is kept."""
    base_path = save_tiny_base(tmp_path, task_type, family)
    batch = make_batch(task_type)
    base = load_base(base_path, task_type)
    config = PromptTuningConfig(task_type=task_type, num_virtual_tokens=4)
    model = get_peft_model(load_base(base_path, task_type), config)
    with torch.no_grad():  # a trained prompt and head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    expected, prompted = outputs_of(base, task_type, batch), outputs_of(model, task_type, batch)
    with model.disable_adapter():
        assert_same_outputs(expected, outputs_of(model, task_type, batch))
    assert_same_outputs(prompted, outputs_of(model, task_type, batch))
    assert trainable == [n for n, p in model.named_parameters() if p.requires_grad]

"""The compatibility patches leave stock PEFT methods exactly as they were; what peftlab adds to saved adapters."""

import importlib.metadata
import json
import warnings

import pytest
import torch
from peft import (
    AutoPeftModelForSequenceClassification,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForSeq2SeqLM,
    PeftModelForTokenClassification,
    PromptTuningConfig,
    get_peft_model,
)
from peft.peft_model import PeftModelForCausalLM, PeftModelForQuestionAnswering
from tiny import (
    assert_same_outputs,
    load_base,
    make_batch,
    model_inputs,
    outputs_in_fresh_process,
    outputs_of,
    save_tiny_base,
)

import peftlab
from peftlab import BitFitConfig, ResidualPromptTuningConfig, UniPELTConfig, XPromptConfig
from peftlab.integration import MODEL_CARD_HEADING


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


def test_stock_causal_prompt_tuning_generate_unchanged(tmp_path, monkeypatch):
    """Patch 8 (the cache under its old name) is for peftlab prompt types: stock PROMPT_TUNING generates as in stock
    PEFT, its upstream cache bug included."""
    model = get_peft_model(
        load_base(save_tiny_base(tmp_path, "CAUSAL_LM", "llama"), "CAUSAL_LM"),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(20)  # a prompt whose repetition changes the tokens
    inputs = model_inputs(make_batch("CAUSAL_LM"))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    patched = model.generate(**inputs, **kwargs)
    stock_prepare = PeftModelForCausalLM.prepare_inputs_for_generation.__wrapped__
    monkeypatch.setattr(PeftModelForCausalLM, "prepare_inputs_for_generation", stock_prepare)
    assert torch.equal(patched, model.generate(**inputs, **kwargs))


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


STOCK_CONFIGS = {
    "lora": lambda: LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]),
    "ia3": lambda: IA3Config(task_type="SEQ_CLS", target_modules=["query", "value"], feedforward_modules=[]),
    "prompt_tuning": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
}
PEFTLAB_CONFIGS = {
    "bitfit": lambda: BitFitConfig(task_type="SEQ_CLS"),
    "unipelt": lambda: UniPELTConfig(task_type="SEQ_CLS", prefix_length=2, prefix_hidden_size=8),
    "xprompt": lambda: XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=4, num_pieces=4),
    "rpt": lambda: ResidualPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_bottleneck_size=8),
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("integration"), "SEQ_CLS", "bert")


def saved_adapter(folder, bert, make_config, **save_kwargs):
    """A model with non-zero adapter values (so that a wrong load shows in the outputs), saved to `folder`."""
    model = get_peft_model(load_base(bert, "SEQ_CLS"), make_config())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.5)
    model.save_pretrained(folder, **save_kwargs)
    return model


def pickled_adapter(folder, bert, make_config):
    model = saved_adapter(folder, bert, make_config, safe_serialization=False)
    assert (folder / "adapter_model.bin").exists() and not (folder / "adapter_model.safetensors").exists()
    return model


def assert_loads_same(model, bert, folder):
    batch = make_batch("SEQ_CLS")
    reloaded = PeftModel.from_pretrained(load_base(bert, "SEQ_CLS"), folder)
    assert_same_outputs(outputs_of(model, "SEQ_CLS", batch), outputs_of(reloaded, "SEQ_CLS", batch))


@pytest.fixture
def every_pickle_refused():
    peftlab.refuse_pickled_adapters()
    yield
    peftlab.refuse_pickled_adapters(False)


@pytest.mark.parametrize("make_config", STOCK_CONFIGS.values(), ids=STOCK_CONFIGS.keys())
def test_stock_pickled_adapters_load_after_import_peftlab_as_without_it(tmp_path, bert, make_config):
    model = pickled_adapter(tmp_path / "ad", bert, make_config)
    assert_loads_same(model, bert, tmp_path / "ad")


@pytest.mark.parametrize("make_config", PEFTLAB_CONFIGS.values(), ids=PEFTLAB_CONFIGS.keys())
def test_pickled_peftlab_adapters_load_only_on_request(tmp_path, bert, make_config):
    model = pickled_adapter(tmp_path / "ad", bert, make_config)
    with pytest.raises(ValueError, match=r"refusing to load pickled adapter weights .*adapter_model\.bin"):
        PeftModel.from_pretrained(load_base(bert, "SEQ_CLS"), tmp_path / "ad")
    with peftlab.allow_pickled_adapters():
        assert_loads_same(model, bert, tmp_path / "ad")


def test_every_pickle_refused_on_request_and_allowed_in_a_block(tmp_path, bert, every_pickle_refused):
    model = pickled_adapter(tmp_path / "ad", bert, STOCK_CONFIGS["lora"])
    with pytest.raises(ValueError, match=r"refusing to load pickled .*peftlab\.refuse_pickled_adapters\(\)"):
        PeftModel.from_pretrained(load_base(bert, "SEQ_CLS"), tmp_path / "ad")
    with peftlab.allow_pickled_adapters():
        assert_loads_same(model, bert, tmp_path / "ad")
    peftlab.refuse_pickled_adapters(False)  # back to the default: stock types load as with stock PEFT
    assert_loads_same(model, bert, tmp_path / "ad")


def test_refuse_pickled_adapters_needs_a_bool():
    with pytest.raises(ValueError, match="everywhere must be True or False, got 'yes'"):
        peftlab.refuse_pickled_adapters("yes")


@pytest.mark.parametrize(
    ("config_cls", "peft_type"),
    [
        (BitFitConfig, "BITFIT"),
        (UniPELTConfig, "UNIPELT"),
        (XPromptConfig, "XPROMPT"),
        (ResidualPromptTuningConfig, "RESIDUAL_PROMPT_TUNING"),
    ],
)
def test_peftlab_configs_build_with_their_defaults_like_stock_ones(config_cls, peft_type):
    """As PEFT's own test_config.py::test_from_peft_type does for every registered type."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prompt configs' hint about the unset task_type, tested below
        config = PeftConfig.from_peft_type(peft_type=peft_type)
    assert type(config) is config_cls
    assert config.peftlab_version == importlib.metadata.version("peftlab")


@pytest.mark.parametrize("config_cls", [XPromptConfig, ResidualPromptTuningConfig])
def test_prompt_config_without_task_type_warns_and_is_refused_when_the_adapter_is_built(bert, config_cls):
    with pytest.warns(UserWarning, match=rf"{config_cls.__name__}\.task_type is None: set it .*KeyError: None"):
        config = config_cls(num_virtual_tokens=4)
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.task_type must be one of SEQ_CLS, .*got None"):
        PeftModel(load_base(bert, "SEQ_CLS"), config)


@pytest.mark.parametrize("config_cls", [XPromptConfig, ResidualPromptTuningConfig])
def test_prompt_config_without_length_is_refused_when_the_adapter_is_built(bert, config_cls):
    config = config_cls(task_type="SEQ_CLS", num_virtual_tokens=None)
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.num_virtual_tokens must be a positive integer"):
        get_peft_model(load_base(bert, "SEQ_CLS"), config)


@pytest.mark.parametrize("make_config", PEFTLAB_CONFIGS.values(), ids=PEFTLAB_CONFIGS.keys())
def test_saved_adapter_names_peftlab_and_loads_without_warnings(tmp_path, bert, make_config):
    model = saved_adapter(tmp_path / "ad", bert, make_config)
    model.save_pretrained(tmp_path / "ad")  # a second save (as each Trainer checkpoint) must not repeat the card text
    peft_type = model.peft_config["default"].peft_type.value
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peftlab_version"] == importlib.metadata.version("peftlab")
    assert "`import peftlab` before loading it" in saved["peftlab_loading"]
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "- peftlab\n" in card.split("---")[1]  # a tag in the card's YAML header
    assert card.count(MODEL_CARD_HEADING) == 1
    assert f"The PEFT type {peft_type} is not part of stock PEFT" in card
    assert "```python\nimport peftlab" in card
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_loads_same(model, bert, tmp_path / "ad")
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "ad")
    assert not [w for w in caught if "peftlab" in str(w.message) or "Unexpected keyword" in str(w.message)]


def test_stock_adapter_files_are_saved_as_without_peftlab(tmp_path, bert):
    saved_adapter(tmp_path / "ad", bert, STOCK_CONFIGS["lora"])
    assert "peftlab" not in (tmp_path / "ad" / "adapter_config.json").read_text()
    assert "peftlab" not in (tmp_path / "ad" / "README.md").read_text()


def test_without_import_peftlab_loading_fails_in_stock_peft_before_reading_the_files(tmp_path, bert):
    """The limit the saved files work around: stock PEFT looks the saved peft_type up in its type -> config class
    dict first, so no field of adapter_config.json can change this error; the files say how to load instead."""
    saved_adapter(tmp_path / "ad", bert, PEFTLAB_CONFIGS["bitfit"])
    with pytest.raises(AssertionError, match="KeyError: 'BITFIT'"):
        outputs_in_fresh_process(
            tmp_path, task_type="SEQ_CLS", batch=make_batch("SEQ_CLS"), adapter=tmp_path / "ad", base=bert,
            import_peftlab=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("task_type", "family", "config"),
    [
        ("SEQ_CLS", "bert", ResidualPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)),
        ("SEQ_2_SEQ_LM", "t5", XPromptConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, num_pieces=4)),
    ],
)
def test_peftlab_prompt_disable_adapter_gives_the_base_model(tmp_path, task_type, family, config):
    """Stock PEFT fails here (BERT: no prepare_inputs_for_generation) or keeps the trained head / the seq2seq prompt
    in generate; for peftlab prompt types the disabled model is the base model, and the head's trainability is kept."""
    base_path = save_tiny_base(tmp_path, task_type, family)
    batch = make_batch(task_type)
    base = load_base(base_path, task_type)
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


def test_stock_prompt_tuning_disable_adapter_is_stock_peft(tmp_path):
    """Importing peftlab leaves stock types on stock PEFT's own disable_adapter (seq2seq: it keeps the prompt)."""
    base_path = save_tiny_base(tmp_path, "SEQ_2_SEQ_LM", "t5")
    model = get_peft_model(
        load_base(base_path, "SEQ_2_SEQ_LM"), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    )
    inputs = model_inputs(make_batch("SEQ_2_SEQ_LM"))
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    with model.disable_adapter():
        patched = model.generate(**inputs, **kwargs)
    with PeftModel.disable_adapter.__wrapped__(model):
        stock = PeftModelForSeq2SeqLM.generate.__wrapped__(model, **inputs, **kwargs)
    assert torch.equal(patched, stock)

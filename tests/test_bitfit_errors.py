"""BitFit bad input: invalid config values, selections that match nothing, foreign adapters, pickled weights."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import AUTO_MODEL, assert_same_outputs, load_base, make_batch, outputs_of, save_tiny_base, tiny_config

import peftlab
from peftlab import BitFitConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bias_terms": "everything"}, r"bias_terms must be 'all', 'paper', or a non-empty list.*'everything'"),
        ({"bias_terms": []}, r"bias_terms must be 'all', 'paper', or a non-empty list.*\[\]"),
        ({"bias_terms": ["query", 3]}, r"bias_terms must be .*\['query', 3\]"),
        ({"bias_terms": ["query", "(unclosed"]}, r"bias_terms pattern '\(unclosed' is not a valid regular expression"),
        ({"add_missing_biases": "no"}, r"add_missing_biases must be True or False, got 'no'"),
    ],
)
def test_invalid_config_values_raise_at_config_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BitFitConfig(task_type="SEQ_CLS", **kwargs)


@pytest.fixture
def bert(tmp_path):
    return save_tiny_base(tmp_path, "SEQ_CLS", "bert")


def test_pattern_matching_nothing_names_the_pattern_and_the_choices(bert):
    config = BitFitConfig(task_type="SEQ_CLS", bias_terms=["query", "q_proj"])
    with pytest.raises(ValueError, match=r"bias_terms pattern 'q_proj' matches no .* e\.g\. one of: .*query"):
        get_peft_model(load_base(bert, "SEQ_CLS"), config)


def test_pattern_on_the_task_head_matches_nothing(bert):
    # the head is trained through modules_to_save and never given a BitFit bias
    with pytest.raises(ValueError, match=r"bias_terms pattern 'classifier' matches no"):
        get_peft_model(load_base(bert, "SEQ_CLS"), BitFitConfig(task_type="SEQ_CLS", bias_terms=["classifier"]))


def test_hand_set_target_modules_matching_nothing(bert):
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] selects no layer"):
        get_peft_model(load_base(bert, "SEQ_CLS"), BitFitConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))


def test_everything_excluded(bert):
    with pytest.raises(ValueError, match=r"bias_terms='all' selects no layer"):
        get_peft_model(load_base(bert, "SEQ_CLS"), BitFitConfig(task_type="SEQ_CLS", exclude_modules=".*"))


def test_bias_free_model_with_add_missing_biases_false(tmp_path):
    model = load_base(save_tiny_base(tmp_path, "CAUSAL_LM", "llama"), "CAUSAL_LM")
    with pytest.raises(ValueError, match=r"bias_terms='all' with add_missing_biases=False selects no layer"):
        get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM", add_missing_biases=False))


class _EmbeddingOnly(torch.nn.Module):
    """A model without a single Linear, Conv1D or norm layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x)


def test_unsupported_model_without_bias_layers():
    with pytest.raises(ValueError, match=r"bias_terms='all' selects no layer of this _EmbeddingOnly: BitFit needs"):
        get_peft_model(_EmbeddingOnly(), BitFitConfig())


def test_paper_subset_for_unknown_architecture():
    with pytest.raises(ValueError, match=r"bias_terms='paper' has no layer map for model_type=None; it is defined for"):
        get_peft_model(_EmbeddingOnly(), BitFitConfig(bias_terms="paper"))


def test_paper_subset_impossible_for_gpt2_fused_attention(tmp_path):
    model = load_base(save_tiny_base(tmp_path, "CAUSAL_LM", "gpt2"), "CAUSAL_LM")
    with pytest.raises(ValueError, match=r"bias_terms='paper' is not available for gpt2: .*fused c_attn"):
        get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM", bias_terms="paper"))


def test_adapter_into_base_of_another_shape_names_both_shapes(tmp_path, bert):
    # stock PEFT already refuses this: torch's load_state_dict reports each mismatching key with both shapes
    get_peft_model(load_base(bert, "SEQ_CLS"), BitFitConfig(task_type="SEQ_CLS")).save_pretrained(tmp_path / "ad")
    config = tiny_config("bert")
    config.hidden_size, config.intermediate_size = 48, 96
    AUTO_MODEL["SEQ_CLS"].from_config(config).save_pretrained(tmp_path / "wider")
    with pytest.raises(
        RuntimeError,
        match=r"attention\.self\.query\.bitfit_bias\.default: copying a param with shape "
        r"torch\.Size\(\[32\]\) from checkpoint, the shape in current model is "
        r"torch\.Size\(\[48\]\)",
    ):
        PeftModel.from_pretrained(load_base(tmp_path / "wider", "SEQ_CLS"), tmp_path / "ad")


def test_pickled_adapter_refused_unless_caller_opts_in(tmp_path, bert):
    batch = make_batch("SEQ_CLS")
    model = get_peft_model(load_base(bert, "SEQ_CLS"), BitFitConfig(task_type="SEQ_CLS"))
    with torch.no_grad():  # non-zero adapter values, so that the comparison below can fail
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    model.save_pretrained(tmp_path / "ad", safe_serialization=False)
    assert (tmp_path / "ad" / "adapter_model.bin").exists()
    assert not (tmp_path / "ad" / "adapter_model.safetensors").exists()
    with pytest.raises(
        ValueError,
        match=r"refusing to load pickled adapter weights .*adapter_model\.bin.*"
        r"peftlab\.allow_pickled_adapters",
    ):
        PeftModel.from_pretrained(load_base(bert, "SEQ_CLS"), tmp_path / "ad")
    with peftlab.allow_pickled_adapters():
        reloaded = PeftModel.from_pretrained(load_base(bert, "SEQ_CLS"), tmp_path / "ad")
    assert_same_outputs(outputs_of(model, "SEQ_CLS", batch), outputs_of(reloaded, "SEQ_CLS", batch))
    with pytest.raises(ValueError, match="refusing to load pickled"):  # the opt-in ends with the block
        PeftModel.from_pretrained(load_base(bert, "SEQ_CLS"), tmp_path / "ad")

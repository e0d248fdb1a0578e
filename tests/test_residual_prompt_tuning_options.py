"""Residual Prompt Tuning: the encoder's formula and options, prompt initialisation, and refusal of bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from tiny import NUM_LABELS, VOCAB, load_base, save_tiny_base, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from peftlab import ResidualPromptTuningConfig
from peftlab.methods.residual_prompt_tuning.encoder import ResidualPromptEncoder

N, D, M = 4, 32, 16


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("rpt-options"), "SEQ_CLS", "bert")


def encoder_of(base, **options):
    config = ResidualPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N, encoder_bottleneck_size=M, **options)
    model = get_peft_model(load_base(base, "SEQ_CLS"), config)
    return model, model.prompt_encoder["default"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"encoder_layer_norm": True},
        {"encoder_residual": False},
        {"encoder_nonlinearity": "tanh", "encoder_layer_norm": True},
        {"encoder_nonlinearity": "sigmoid"},
    ],
)
def test_shared_mlp_formula(bert_base, options):
    _, encoder = encoder_of(bert_base, **options)
    mlp = encoder.mlp
    prompt = encoder.embedding.weight
    activations = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    act = activations[options.get("encoder_nonlinearity", "relu")]
    out = F.linear(act(F.linear(prompt, mlp.down.weight, mlp.down.bias)), mlp.up.weight, mlp.up.bias)
    if options.get("encoder_layer_norm", False):  # a BERT-style encoder: no LayerNorm unless asked for
        out = F.layer_norm(out, (D,), mlp.layer_norm.weight, mlp.layer_norm.bias)
    if options.get("encoder_residual", True):
        out = out + prompt
    with torch.no_grad():
        torch.testing.assert_close(encoder.reparameterized_prompt(), out)
        # the encoder's output for PEFT's (1, n) index row is that table
        torch.testing.assert_close(encoder(torch.arange(N)[None]), out[None])
    assert mlp.down.weight.shape == (M, D) and mlp.up.weight.shape == (D, M)


def test_separate_mlps_act_along_the_token_axis(bert_base):
    _, encoder = encoder_of(bert_base, encoder_separate=True, encoder_layer_norm=True)
    mlp = encoder.mlp
    prompt = encoder.embedding.weight
    assert mlp.down_weight.shape == (N, D, M) and mlp.up_weight.shape == (N, M, D)
    assert mlp.norm_weight.shape == (N, D)
    # the MLPs are initialised independently, each like nn.Linear
    assert not torch.equal(mlp.down_weight[0], mlp.down_weight[1])
    assert mlp.down_weight.abs().max() <= 1 / D**0.5 and mlp.up_weight.abs().max() <= 1 / M**0.5
    with torch.no_grad():
        out = encoder.reparameterized_prompt()
        for i in range(N):  # token i through its own MLP, written with plain torch ops
            hidden = torch.relu(prompt[i] @ mlp.down_weight[i] + mlp.down_bias[i])
            expected = (
                F.layer_norm(hidden @ mlp.up_weight[i] + mlp.up_bias[i], (D,), mlp.norm_weight[i], mlp.norm_bias[i])
                + prompt[i]
            )
            torch.testing.assert_close(out[i], expected)
        # changing MLP j changes row j of P' only
        mlp.down_weight[2].mul_(3.0)
        mlp.up_bias[2].add_(1.0)
        changed = (encoder.reparameterized_prompt() != out).any(dim=1)
    assert changed.tolist() == [False, False, True, False]


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize(
    ("task_type", "family", "expected"),
    # the authors' T5 code (arazd/ResidualPrompts) has the LayerNorm, their BERT code (ProgressivePrompts) has none
    [("SEQ_2_SEQ_LM", "t5", True), ("SEQ_CLS", "bert", False), ("CAUSAL_LM", "llama", False)],
)
def test_layer_norm_defaults_per_family_and_an_explicit_setting_wins(tmp_path, task_type, family, expected, separate):
    base = save_tiny_base(tmp_path, task_type, family)
    for setting, want in ((None, expected), (not expected, not expected)):
        config = ResidualPromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=N,
            encoder_bottleneck_size=M,
            encoder_separate=separate,
            encoder_layer_norm=setting,
        )
        mlp = get_peft_model(load_base(base, task_type), config).prompt_encoder["default"].mlp
        has_norm = mlp.norm_weight is not None if separate else isinstance(mlp.layer_norm, torch.nn.LayerNorm)
        assert has_norm is want, (setting, want)


def test_gradient_of_token_i_reaches_only_mlp_i(bert_base):
    _, encoder = encoder_of(bert_base, encoder_separate=True)
    (encoder.reparameterized_prompt()[1] * torch.randn(D)).sum().backward()  # a plain sum is flat under LN
    grads = encoder.mlp.down_weight.grad.abs().sum(dim=(1, 2))
    assert grads[1] > 0 and grads[[0, 2, 3]].eq(0).all()


def test_sample_vocab_init_uses_actual_vocabulary_rows(bert_base):
    model, encoder = encoder_of(bert_base)  # SAMPLE_VOCAB is the default, as in the official code
    vocab = model.get_base_model().get_input_embeddings().weight
    for row in encoder.embedding.weight:
        assert (vocab == row).all(dim=1).any()


def test_random_init_is_uniform_in_half_unit_interval(bert_base):
    model, encoder = encoder_of(bert_base, prompt_tuning_init="RANDOM")
    weight = encoder.embedding.weight
    assert weight.min() >= -0.5 and weight.max() <= 0.5 and weight.std() > 0.2
    vocab = model.get_base_model().get_input_embeddings().weight
    assert not any((vocab == row).all(dim=1).any() for row in weight)


def test_text_init_uses_the_tokenized_text(bert_base, tmp_path):
    vocab = {"[UNK]": 0, "great": 7, "movie": 11, "review": 20}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    model, encoder = encoder_of(
        bert_base,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="great movie review",
        tokenizer_name_or_path=str(tmp_path / "tok"),
    )
    words = model.get_base_model().get_input_embeddings().weight
    assert torch.equal(encoder.embedding.weight, words[[7, 11, 20, 7]])  # repeated up to the prompt length


@pytest.mark.parametrize(
    ("options", "field", "value"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens", "0"),
        ({"num_virtual_tokens": -3}, "num_virtual_tokens", "-3"),
        ({"encoder_bottleneck_size": 0}, "encoder_bottleneck_size", "0"),
        ({"encoder_bottleneck_size": 2.5}, "encoder_bottleneck_size", "2.5"),
        ({"encoder_nonlinearity": "gelu"}, "encoder_nonlinearity", "relu, tanh, sigmoid.*'gelu'"),
        ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init", "TEXT, SAMPLE_VOCAB, RANDOM.*'ZEROS'"),
        ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}, "tokenizer_name_or_path", "None"),
        ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "tok"}, "prompt_tuning_init_text", "None"),
        ({"encoder_dropout": 1.0}, "encoder_dropout", "1.0"),
        ({"encoder_layer_norm": "yes"}, "encoder_layer_norm", "True, False or None.*'yes'"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules", "decoder prompts.*2"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(options, field, value):
    kwargs = {"task_type": "SEQ_CLS", **options}
    with pytest.raises(ValueError, match=rf"ResidualPromptTuningConfig\.{field}.*{value}"):
        ResidualPromptTuningConfig(**kwargs)


def test_loading_into_another_hidden_size_names_both_shapes(bert_base, tmp_path):
    model, _ = encoder_of(bert_base)
    model.save_pretrained(tmp_path / "adapter")
    config = tiny_config("bert", NUM_LABELS)
    config.hidden_size = 64
    wider = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match=rf"\({N}, {D}\).*\({VOCAB}, 64\)"):
        PeftModel.from_pretrained(wider, tmp_path / "adapter")


def test_token_dim_that_does_not_fit_the_model_is_refused(bert_base):
    with pytest.raises(ValueError, match=rf"\({N}, 48\).*\({VOCAB}, {D}\)"):
        encoder_of(bert_base, token_dim=48)


def test_checkpoint_prompt_of_another_shape_names_both_shapes(bert_base, tmp_path):
    model, _ = encoder_of(bert_base)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base(bert_base, "SEQ_CLS"), tmp_path / "adapter")
    with pytest.raises(ValueError, match=rf"'prompt_embeddings' has shape \(5, {D}\).*\({N}, {D}\)"):
        loaded.prompt_encoder["default"]._load_adapter_state_dict({"prompt_embeddings": torch.zeros(5, D)})


def test_model_without_token_embeddings_is_refused():
    config = ResidualPromptTuningConfig(task_type="FEATURE_EXTRACTION", token_dim=D, num_transformer_submodules=1)
    with pytest.raises(ValueError, match="get_input_embeddings.*Identity"):
        ResidualPromptEncoder(config, torch.nn.Identity())

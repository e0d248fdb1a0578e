"""BitFit beyond the conformance matrix (tests/test_conformance.py): parameter counts from the config, saved files,
the paper subset, exact exports and merges, a second adapter with other bias terms."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import (
    AUTO_MODEL,
    TASK_FAMILIES,
    assert_same_outputs,
    load_base,
    make_batch,
    outputs_in_one_fresh_process,
    outputs_of,
    save_tiny_base,
    tiny_config,
    train_steps,
)

import peftlab
from peftlab import BitFitConfig

HEADS = {"SEQ_CLS": "classifier", "TOKEN_CLS": "classifier", "QUESTION_ANS": "qa_outputs"}
IDS = [f"{task}-{family}" for task, family in TASK_FAMILIES]
# the adapters that export_adapter can express as a stock transformers model (T5 cannot: tested separately)
EXPORTABLE = [
    (task, family, bias_terms) for task, family in TASK_FAMILIES for bias_terms in ["all"] if family in ("bert", "gpt2")
] + [("CAUSAL_LM", "llama", "paper"), ("CAUSAL_LM", "llama", "all")]
# exports whose RMSNorm biases are folded into the linear layers after them: equal up to float rounding, and
# merge_and_unload (which cannot give an RMSNorm a bias) refuses them
FOLDED = {("CAUSAL_LM", "llama", "all")}


def expected_bias_count(task_type: str, family: str, bias_terms: str = "all") -> int:
    """Trainable parameters BitFit should report, from the model config alone (hidden sizes and layer counts)."""
    num_labels = 2 if task_type == "QUESTION_ANS" else 3
    config = tiny_config(family, num_labels)
    if family == "bert":
        h, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        pooler = h if task_type in ("SEQ_CLS", "FEATURE_EXTRACTION") else 0  # BERT's pooler dense layer
        head = (h + 1) * num_labels if task_type in HEADS else 0
        if bias_terms == "paper":
            return layers * (h + ff) + pooler + head  # query, intermediate; the official code adds the pooler
        per_layer = 4 * h + h + ff + h + h  # q, k, v, attention output; its LayerNorm; intermediate; output; LayerNorm
        return layers * per_layer + h + pooler + head  # + embeddings LayerNorm
    if family == "gpt2":
        h, inner = config.n_embd, config.n_inner or 4 * config.n_embd
        return config.n_layer * (h + 3 * h + h + h + inner + h) + h  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; ln_f
    if family == "llama":
        h, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        kv = config.num_key_value_heads * (h // config.num_attention_heads)
        if bias_terms == "paper":
            return layers * (h + 2 * ff)  # q_proj; gate_proj and up_proj
        # q, k, v, o; gate, up, down; the 2 RMSNorms (folded at export); not the final norm, which feeds the LM head
        return layers * (h + 2 * kv + h + 2 * ff + h + 2 * h)
    if family == "t5":
        d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
        if bias_terms == "paper":
            return config.num_layers * (inner + ff) + config.num_decoder_layers * (2 * inner + ff)
        attention, feed_forward = 3 * inner + d, ff + d  # q, k, v, o; wi, wo (T5's norms: left out, no bias to hold)
        encoder, decoder = config.num_layers, config.num_decoder_layers
        return encoder * (attention + feed_forward) + decoder * (2 * attention + feed_forward)
    raise ValueError(family)


def _train_one(tmp_path, task_type: str, family: str, bias_terms: str = "all") -> dict:
    base_path = save_tiny_base(tmp_path, task_type, family)
    batch = make_batch(task_type)
    base_outputs = outputs_of(load_base(base_path, task_type), task_type, batch)
    model = get_peft_model(load_base(base_path, task_type), BitFitConfig(task_type=task_type, bias_terms=bias_terms))
    step0 = outputs_of(model, task_type, batch)
    train_steps(model, batch)
    trained = outputs_of(model, task_type, batch)
    with model.disable_adapter():
        disabled = outputs_of(model, task_type, batch)
    adapter = tmp_path / f"adapter-{family}-{task_type.lower()}-{bias_terms}"
    model.save_pretrained(adapter)
    return {
        "model": model,
        "base": base_path,
        "adapter": adapter,
        "batch": batch,
        "base_outputs": base_outputs,
        "step0": step0,
        "trained": trained,
        "disabled": disabled,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every task type trained a few steps; the llama paper subset too (it is the exportable LLaMA adapter)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("bitfit")
    cases = [(task, family, "all") for task, family in TASK_FAMILIES] + [("CAUSAL_LM", "llama", "paper")]
    return {case: _train_one(tmp, *case) for case in cases}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict:
    """Every exportable adapter exported, then loaded by plain transformers in one process without peftlab."""
    tmp = tmp_path_factory.mktemp("export")
    jobs = []
    for case in EXPORTABLE:
        run = runs[case]
        path = peftlab.export_adapter(run["model"], tmp / "-".join(case))
        jobs.append({"task_type": case[0], "batch": run["batch"], "adapter": path, "loader": "transformers"})
    outputs = outputs_in_one_fresh_process(tmp, jobs, import_peftlab=False)
    return dict(zip(EXPORTABLE, outputs, strict=True))


@pytest.mark.parametrize(("task_type", "family"), TASK_FAMILIES, ids=IDS)
def test_step0_and_disabled_adapter_equal_base_model(runs, task_type, family):
    run = runs[(task_type, family, "all")]
    assert_same_outputs(run["base_outputs"], run["step0"])
    assert_same_outputs(run["base_outputs"], run["disabled"])
    main_output = next(iter(run["trained"]))  # logits, start_logits or last_hidden_state
    assert not torch.equal(run["trained"][main_output], run["base_outputs"][main_output])


def test_reload_of_paper_subset_is_identical(runs, tmp_path):
    """The conformance matrix reloads the default ("all") adapters; the paper subset is reloaded here, in a fresh
    process with PeftModel.from_pretrained and AutoPeftModelFor*."""
    run = runs[("CAUSAL_LM", "llama", "paper")]
    jobs = [
        {
            "task_type": "CAUSAL_LM",
            "batch": run["batch"],
            "adapter": run["adapter"],
            "base": run["base"],
            "loader": loader,
        }
        for loader in ("peft", "auto")
    ]
    for reloaded in outputs_in_one_fresh_process(tmp_path, jobs):
        assert_same_outputs(run["trained"], reloaded)


@pytest.mark.parametrize(("task_type", "family"), TASK_FAMILIES, ids=IDS)
def test_saved_adapter_holds_only_biases_and_head(runs, task_type, family):
    run = runs[(task_type, family, "all")]
    config = json.loads((run["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT"
    weights_file = run["adapter"] / "adapter_model.safetensors"
    saved = load_file(weights_file)
    for key in saved:
        head = HEADS.get(task_type)
        assert key.count("bitfit_") == 1 and key.endswith(".bitfit_bias") or (head and f".{head}." in key), key
    n_values = sum(t.numel() for t in saved.values())
    assert n_values == expected_bias_count(task_type, family)
    assert weights_file.stat().st_size < 4 * n_values + 16_384  # float32 values plus the safetensors header


# GPT-2 has no paper subset (its fused c_attn: see test_bitfit_errors)
COUNT_CASES = [(t, f, b) for t, f in TASK_FAMILIES for b in ("all", "paper") if (f, b) != ("gpt2", "paper")]


@pytest.mark.parametrize(("task_type", "family", "bias_terms"), COUNT_CASES, ids=["-".join(c) for c in COUNT_CASES])
def test_trainable_parameters_match_config_formula(tmp_path, capsys, task_type, family, bias_terms):
    base = load_base(save_tiny_base(tmp_path, task_type, family), task_type)
    model = get_peft_model(base, BitFitConfig(task_type=task_type, bias_terms=bias_terms))
    model.print_trainable_parameters()
    expected = expected_bias_count(task_type, family, bias_terms)
    assert model.get_nb_trainable_parameters()[0] == expected
    assert f"trainable params: {expected:,} " in capsys.readouterr().out


def test_paper_subset_selects_query_and_first_ffn_layers(tmp_path):
    selected, targets = {}, {}
    for task_type, family in [("SEQ_CLS", "bert"), ("CAUSAL_LM", "llama"), ("SEQ_2_SEQ_LM", "t5")]:
        base = load_base(save_tiny_base(tmp_path, task_type, family), task_type)
        model = get_peft_model(base, BitFitConfig(task_type=task_type, bias_terms="paper"))
        targets[family] = model.peft_config["default"].target_modules
        selected[family] = {name.rsplit(".", 1)[-1] for name in targets[family]}
    assert selected == {"bert": {"query", "dense"}, "llama": {"q_proj", "gate_proj", "up_proj"}, "t5": {"q", "wi"}}
    assert "bert.pooler.dense" in targets["bert"]  # the official code trains the pooler's bias with the subset


@pytest.mark.parametrize(("bias_terms", "expected"), [("paper", 46_848), ("all", 102_912)])
def test_bert_base_bias_counts(bias_terms, expected):
    """BERT-base sizes from its config (meta device: no weights): the official code's and the paper's counts."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_labels=2)  # 12 layers, hidden 768, intermediate 3072
    with torch.device("meta"):
        base = BertForSequenceClassification(config)
    body = sum(p.numel() for p in base.bert.parameters())
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", bias_terms=bias_terms))
    h, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    # paper: query + intermediate + pooler = 46,848; all: 7 h-sized biases per layer + ff, embeddings LayerNorm, pooler
    formula = layers * (h + ff) + h if bias_terms == "paper" else layers * (7 * h + ff) + 2 * h
    assert formula == expected
    assert model.get_nb_trainable_parameters()[0] == expected + (h + 1) * 2  # + the classifier
    assert round(100 * expected / body, 2) == {"paper": 0.04, "all": 0.09}[bias_terms]  # the paper's percentages


def _saved(tmp_path, task_type: str, config):
    path = tmp_path / "custom-base"
    AUTO_MODEL[task_type].from_config(config).save_pretrained(path)
    return path


def test_bias_less_layers_left_alone_on_request(tmp_path):
    config = tiny_config("llama")
    config.attention_bias = True  # q/k/v/o have biases, the MLP and the RMSNorms have none
    model = get_peft_model(
        load_base(_saved(tmp_path, "CAUSAL_LM", config), "CAUSAL_LM"),
        BitFitConfig(task_type="CAUSAL_LM", add_missing_biases=False),
    )
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert model.get_nb_trainable_parameters()[0] == config.num_hidden_layers * (2 * config.hidden_size + 2 * kv)


@pytest.mark.parametrize("case", EXPORTABLE, ids=["-".join(c) for c in EXPORTABLE])
def test_export_loads_without_peftlab_with_identical_outputs(runs, exported, case):
    """Stricter than the matrix's export check (1e-6 on every BitFit row): exact unless folded, bit for bit the
    merged model, and the exported-from model left as it was."""
    run = runs[case]
    model = run["model"]
    assert isinstance(model, PeftModel)  # exporting left the trained model as it was
    assert_same_outputs(run["trained"], outputs_of(model, case[0], run["batch"]))
    if case not in FOLDED:
        merged = outputs_of(copy.deepcopy(model).merge_and_unload(), case[0], run["batch"])
        assert_same_outputs(merged, exported[case])  # the exported model is the merged one, bit for bit
    # the trained delta is in the bias either way (W(y + b) = Wy + Wb for a folded norm bias: rounding differs)
    assert_same_outputs(run["trained"], exported[case], atol=1e-6 if case in FOLDED else 0.0)


@pytest.mark.parametrize("bias_terms", ["paper", "all"])
def test_export_sets_llama_bias_flags(runs, tmp_path, bias_terms):
    path = peftlab.export_adapter(runs[("CAUSAL_LM", "llama", bias_terms)]["model"], tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True


def test_export_refuses_biases_the_architecture_cannot_hold(runs, tmp_path):
    with pytest.raises(ValueError, match="cannot be exported") as error:
        peftlab.export_adapter(runs[("SEQ_2_SEQ_LM", "t5", "all")]["model"], tmp_path / "out")
    assert "encoder.block.0.layer.0.SelfAttention.q (Linear)" in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("task_type", "family", "bias_terms"),
    [
        ("SEQ_CLS", "bert", "all"),
        ("CAUSAL_LM", "gpt2", "all"),
        ("CAUSAL_LM", "llama", "paper"),
        ("SEQ_2_SEQ_LM", "t5", ["q", "k", "v", "o", "wi", "wo"]),  # bias-less Linear layers: merging creates the bias
    ],
)
def test_merge_unmerge_and_merge_and_unload(tmp_path, task_type, family, bias_terms):
    base_path = save_tiny_base(tmp_path, task_type, family)
    batch = make_batch(task_type)
    model = get_peft_model(load_base(base_path, task_type), BitFitConfig(task_type=task_type, bias_terms=bias_terms))
    train_steps(model, batch)
    trained = outputs_of(model, task_type, batch)
    base_parameters = {name: p.clone() for name, p in model.named_parameters() if "bitfit_" not in name}
    model.merge_adapter()
    assert_same_outputs(trained, outputs_of(model, task_type, batch))
    model.unmerge_adapter()
    assert_same_outputs(trained, outputs_of(model, task_type, batch))
    unmerged = {name: p for name, p in model.named_parameters() if "bitfit_" not in name}
    assert unmerged.keys() == base_parameters.keys()  # biases created by the merge are gone again
    assert all(torch.equal(p, base_parameters[name]) for name, p in unmerged.items())  # restored bit for bit
    with model.disable_adapter():
        assert_same_outputs(
            outputs_of(load_base(base_path, task_type), task_type, batch), outputs_of(model, task_type, batch)
        )
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    assert not any("bitfit" in name for name, _ in merged.named_parameters())
    assert_same_outputs(trained, outputs_of(merged, task_type, batch))


def test_merge_refused_before_touching_layers_that_cannot_hold_a_bias(runs):
    model = copy.deepcopy(runs[("CAUSAL_LM", "llama", "all")]["model"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm \(LlamaRMSNorm\).*export_adapter folds"):
        model.merge_and_unload()
    assert not any(module.merged for module in model.modules() if hasattr(module, "merged_adapters"))


@pytest.mark.parametrize(("task_type", "family"), [("SEQ_CLS", "bert"), ("CAUSAL_LM", "llama")])
def test_second_adapter_of_other_terms_starts_at_base_and_trains_alone(tmp_path, task_type, family):
    """What the matrix's adapters check lacks: a second adapter with other bias terms starts at the base model's
    outputs, only its tensors train, and each adapter keeps its own trained outputs (deletion: the matrix)."""
    base_path = save_tiny_base(tmp_path, task_type, family)
    batch = make_batch(task_type)
    model = get_peft_model(load_base(base_path, task_type), BitFitConfig(task_type=task_type))
    train_steps(model, batch)
    first = outputs_of(model, task_type, batch)
    model.add_adapter("paper", BitFitConfig(task_type=task_type, bias_terms="paper"))
    model.set_adapter("paper")
    assert_same_outputs(
        outputs_of(load_base(base_path, task_type), task_type, batch), outputs_of(model, task_type, batch)
    )  # a fresh adapter leaves the base model's outputs
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".paper" in name for name in trainable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, batch, lr=5e-2)
    second = outputs_of(model, task_type, batch)
    model.set_adapter("default")
    assert_same_outputs(first, outputs_of(model, task_type, batch))
    model.set_adapter("paper")
    assert_same_outputs(second, outputs_of(model, task_type, batch))
    assert not torch.equal(first["logits"], second["logits"])


@pytest.mark.slow
def test_bert_base_sized_adapter_is_kilobytes(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_labels=2)  # BERT-base sizes: 12 layers, hidden 768, intermediate 3072
    model = get_peft_model(BertForSequenceClassification(config), BitFitConfig(task_type="SEQ_CLS"))
    assert model.get_nb_trainable_parameters()[0] == 102_912 + (config.hidden_size + 1) * 2  # + the classifier
    model.save_pretrained(tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 450_000, size  # about 410 kB of float32 values, against 440 MB for the full model


def test_hooked_base_layers_run_their_own_forward(runs):
    """A hook on a wrapped layer (e.g. accelerate's offloading) still runs, with the same outputs as the fused path."""
    run = runs[("SEQ_CLS", "bert", "all")]
    model = copy.deepcopy(run["model"])
    calls, hooked = [], 0
    for module in model.modules():
        if hasattr(module, "bitfit_bias"):
            module.base_layer.register_forward_hook(lambda *_: calls.append(1))
            hooked += 1
    assert_same_outputs(run["trained"], outputs_of(model, "SEQ_CLS", run["batch"]), atol=1e-6)
    assert hooked and len(calls) == hooked

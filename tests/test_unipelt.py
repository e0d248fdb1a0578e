"""UniPELT: every task type, save/load in a fresh process, gates, prefix via the attention interface, generation."""

from __future__ import annotations

import json

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
    model_inputs,
    outputs_in_one_fresh_process,
    outputs_of,
    save_tiny_base,
    tiny_config,
    train_steps,
)
from transformers import AutoModelForSequenceClassification, BertConfig

import peftlab  # noqa: F401
from peftlab import UniPELTConfig
from peftlab.methods.unipelt.gates import Gate
from peftlab.methods.unipelt.layers import UniPELTAdapterLinear, UniPELTLoraLinear, UniPELTPrefix

COMPONENT_LAYER = {"lora": UniPELTLoraLinear, "adapter": UniPELTAdapterLinear, "prefix": UniPELTPrefix}


def build(task_type: str, family: str, attn: str = "sdpa", seed: int = 0, **config):
    torch.manual_seed(seed)
    base = AUTO_MODEL[task_type].from_config(tiny_config(family), attn_implementation=attn)
    torch.manual_seed(seed + 1)
    return base, get_peft_model(base, UniPELTConfig(task_type=task_type, **config))


def forward(model, task_type: str, batch: dict) -> torch.Tensor:
    inputs = model_inputs(batch)
    if task_type == "SEQ_2_SEQ_LM":
        inputs["labels"] = batch["labels"]
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def randomize_zero_inits(model) -> None:
    """LoRA B and the adapter's up projection start at zero: give them values so every component has an effect."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, UniPELTLoraLinear):
                for up in [*module.unipelt_lora_B.values(), *module.unipelt_lora_B_v.values()]:
                    up.weight.normal_(0, 0.5)
            if isinstance(module, UniPELTAdapterLinear):
                for up in module.unipelt_adapter_up.values():
                    up.weight.normal_(0, 0.5)


def set_gates(model, layer_cls: type, value: float) -> None:
    """Force the gates of one component (0: sigmoid(-1e4) is exactly 0 in float32; 1: exactly 1)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, layer_cls):
                for gate in module.modules():
                    if isinstance(gate, Gate):
                        gate.weight.zero_()
                        gate.bias.fill_(-1e4 if value == 0 else 1e4)


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"components": ("lora", "bitfit")}, "components"),
        ({"components": ()}, "components"),
        ({"components": []}, "components"),
        ({"lora_r": 0}, "lora_r"),
        ({"prefix_length": -1}, "prefix_length"),
        ({"prefix_hidden_size": 0}, "prefix_hidden_size"),
        ({"adapter_reduction_factor": 0}, "adapter_reduction_factor"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"adapter_nonlinearity": "swish"}, "adapter_nonlinearity"),
        ({"use_gates": "yes"}, "use_gates"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"prefix_target_modules": "(unclosed"}, "prefix_target_modules"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UniPELTConfig(task_type="SEQ_CLS", **kwargs)


@pytest.mark.parametrize("field", ["lora_target_modules", "prefix_target_modules", "adapter_target_modules"])
def test_targets_matching_nothing_name_the_field(field):
    base = AUTO_MODEL["SEQ_CLS"].from_config(tiny_config("bert"))
    with pytest.raises(ValueError, match=field):
        get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS", **{field: ["no_such_module"]}))
    assert not any("unipelt" in n for n, _ in base.named_parameters())  # refused before touching the model


def test_wrong_kind_of_target_and_unknown_architecture():
    base = AUTO_MODEL["SEQ_CLS"].from_config(tiny_config("bert"))
    with pytest.raises(ValueError, match="prefix_target_modules"):
        get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS", prefix_target_modules=["query"]))
    with pytest.raises(ValueError, match="adapter_target_modules"):
        get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS", adapter_target_modules=["attention.self"]))
    base.config.model_type = "unknown-arch"
    with pytest.raises(ValueError, match="lora_target_modules"):
        get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS"))


def test_unsupported_attention_implementation_fails_clearly():
    base = AUTO_MODEL["CAUSAL_LM"].from_config(tiny_config("llama"))
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        get_peft_model(base, UniPELTConfig(task_type="CAUSAL_LM"))
    # switched after wrapping: refused at forward time instead of running without the prefix
    _, model = build("CAUSAL_LM", "llama")
    model.get_base_model().config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        model(**model_inputs(make_batch("CAUSAL_LM")))


def test_gpt2_attention_path_that_bypasses_the_interface_is_refused():
    config = tiny_config("gpt2")
    config.reorder_and_upcast_attn = True
    base = AUTO_MODEL["CAUSAL_LM"].from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        get_peft_model(base, UniPELTConfig(task_type="CAUSAL_LM"))


# --- structure and parameter counts -----------------------------------------------------------------------------------
def test_components_and_variants():
    _, apl = build("SEQ_CLS", "bert")
    names = {type(m) for m in apl.modules()}
    assert {UniPELTLoraLinear, UniPELTAdapterLinear, UniPELTPrefix} <= names
    _, ap = build("SEQ_CLS", "bert", components=("adapter", "prefix"))
    assert UniPELTLoraLinear not in {type(m) for m in ap.modules()}
    # the prefix goes on BERT's self-attention, the adapter after the FFN (not the attention output)
    body = apl.get_base_model().bert.encoder.layer[0]
    assert isinstance(body.attention.self.gated_prefix, UniPELTPrefix)
    assert isinstance(body.output.dense, UniPELTAdapterLinear)
    assert not isinstance(body.attention.output.dense, UniPELTAdapterLinear)
    # no-gates ablation: no gate parameters at all
    _, ungated = build("SEQ_CLS", "bert", use_gates=False)
    assert not any(isinstance(m, Gate) for m in ungated.modules())
    # every state-dict key carries the method prefix exactly once
    for key in apl.state_dict():
        assert key.count("unipelt_") <= 1, key


def test_t5_prefix_on_encoder_and_decoder_self_attention():
    _, model = build("SEQ_2_SEQ_LM", "t5")
    prefixed = [n for n, m in model.named_modules() if isinstance(m, UniPELTPrefix)]
    assert len(prefixed) == 4 and all("SelfAttention" in n for n in prefixed)
    assert any(".encoder." in n for n in prefixed) and any(".decoder." in n for n in prefixed)


def test_bert_base_stored_parameter_count_matches_the_paper():
    """Paper Table 4: UniPELT-APL 1.4M on BERT-base (LoRA 295K + prefix 184K + adapter 895K + gates)."""
    with torch.device("meta"):
        base = AutoModelForSequenceClassification.from_config(BertConfig(num_labels=2))
        model = get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS"))
    counts = model.base_model.parameter_counts()
    lora = 12 * 2 * (768 * 8 + 8 * 768)
    prefix = 12 * 2 * 10 * 768
    adapter = 12 * (768 * 48 + 48 + 48 * 768 + 768)
    gates = 12 * 4 * (768 + 1)
    assert (lora, prefix, adapter) == (294_912, 184_320, 894_528)
    assert counts["stored"] == lora + prefix + adapter + gates == 1_410_672
    assert abs(counts["stored"] - 1.4e6) / 1.4e6 < 0.05
    mlp = 10 * 768 + (768 * 512 + 512) + (512 * 12 * 2 * 768 + 12 * 2 * 768)
    assert counts["trainable"] == lora + adapter + gates + mlp


# --- exact-equality properties --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("task_type", "family"),
    [("SEQ_CLS", "bert"), ("CAUSAL_LM", "llama"), ("SEQ_2_SEQ_LM", "t5"), ("CAUSAL_LM", "gpt2")],
)
def test_disabled_adapter_and_zero_gates_give_the_base_model(task_type, family):
    _, model = build(task_type, family, attn="eager")
    batch = make_batch(task_type)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            expected = forward(model, task_type, batch)
        randomize_zero_inits(model)
        assert not torch.allclose(forward(model, task_type, batch), expected)
        for layer_cls in COMPONENT_LAYER.values():
            set_gates(model, layer_cls, 0.0)
        # the prefix columns get exactly zero attention weight, but the longer key axis changes the order of the
        # float sums in the attention matmul: equal up to rounding (1e-10 here), not bit for bit
        torch.testing.assert_close(forward(model, task_type, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("component", ["lora", "prefix", "adapter"])
def test_one_gate_at_zero_removes_exactly_that_component(component):
    _, model = build("SEQ_CLS", "bert", attn="eager")
    batch = make_batch("SEQ_CLS")
    model.eval()
    randomize_zero_inits(model)
    layer_cls = COMPONENT_LAYER[component]
    with torch.no_grad():
        full = forward(model, "SEQ_CLS", batch)
        set_gates(model, layer_cls, 0.0)
        gated_off = forward(model, "SEQ_CLS", batch)
        for module in model.modules():  # the same model with that component switched off
            if isinstance(module, layer_cls):
                module.enable_adapters(False)
        removed = forward(model, "SEQ_CLS", batch)
    assert not torch.allclose(full, gated_off)
    torch.testing.assert_close(gated_off, removed, rtol=0, atol=1e-6)


def test_padding_is_ignored_by_default_and_counted_on_request():
    batch = make_batch("SEQ_CLS", batch_size=2)
    short = {"input_ids": batch["input_ids"][:1, :8], "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    padded = {
        "input_ids": torch.cat((short["input_ids"], torch.zeros(1, 5, dtype=torch.long)), dim=1),
        "attention_mask": torch.cat((short["attention_mask"], torch.zeros(1, 5, dtype=torch.long)), dim=1),
    }
    for ignore in (True, False):
        _, model = build("TOKEN_CLS", "bert", gate_ignores_padding=ignore)
        randomize_zero_inits(model)
        model.eval()
        with torch.no_grad():
            a = model(**short).logits
            b = model(**padded).logits[:, :8]
        if ignore:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        else:
            assert not torch.allclose(a, b, atol=1e-5)


def test_eager_and_sdpa_agree():
    for task_type, family in [
        ("SEQ_CLS", "bert"),
        ("CAUSAL_LM", "llama"),
        ("SEQ_2_SEQ_LM", "t5"),
        ("CAUSAL_LM", "gpt2"),
    ]:
        outs = []
        for attn in ("eager", "sdpa"):
            _, model = build(task_type, family, attn=attn)
            randomize_zero_inits(model)
            model.eval()
            with torch.no_grad():
                outs.append(forward(model, task_type, make_batch(task_type)))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_cached_generation_equals_uncached(family, attn):
    task_type = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    extra = {"prefix_target_modules": ["SelfAttention", "EncDecAttention"]} if family == "t5" else {}
    _, model = build(task_type, family, attn=attn, **extra)
    randomize_zero_inits(model)
    model.eval()
    batch = make_batch(task_type)
    inputs = model_inputs(batch)
    if task_type == "CAUSAL_LM":  # generation wants left padding
        inputs["input_ids"][-1] = torch.roll(inputs["input_ids"][-1], 3)
        inputs["attention_mask"][-1] = torch.roll(inputs["attention_mask"][-1], 3)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
        scores_cached = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        ).scores
        scores_uncached = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            use_cache=False,
            output_scores=True,
            return_dict_in_generate=True,
        ).scores
    assert torch.equal(cached, uncached)
    for a, b in zip(scores_cached, scores_uncached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_merge_refused_unload_gives_base():
    _, model = build("CAUSAL_LM", "llama")
    batch = make_batch("CAUSAL_LM")
    with torch.no_grad():
        with model.disable_adapter():
            expected = forward(model, "CAUSAL_LM", batch)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    unloaded = model.unload()
    assert not any("unipelt" in n or "gated_prefix" in n for n, _ in unloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(forward(unloaded, "CAUSAL_LM", batch), expected, rtol=0, atol=0)


# --- training and fresh-process round trips over every task type ---------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each (task type, family) trained a few steps and saved; its outputs and parameter snapshots."""
    root = tmp_path_factory.mktemp("unipelt")
    runs = {}
    for task_type, family in TASK_FAMILIES:
        base_path = save_tiny_base(root, task_type, family)
        torch.manual_seed(1)
        model = get_peft_model(load_base(base_path, task_type), UniPELTConfig(task_type=task_type))
        batch = make_batch(task_type)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = train_steps(model, batch, steps=6, lr=1e-2)
        adapter = root / f"adapter-{family}-{task_type.lower()}"
        model.save_pretrained(adapter)
        runs[(task_type, family)] = {
            "model": model,
            "batch": batch,
            "base": base_path,
            "adapter": adapter,
            "losses": losses,
            "before": before,
            "expected": outputs_of(model, task_type, batch),
        }
    return runs


@pytest.mark.parametrize(("task_type", "family"), TASK_FAMILIES)
def test_training_changes_only_unipelt_parameters(trained, task_type, family):
    run = trained[(task_type, family)]
    assert run["losses"][-1] < run["losses"][0]
    changed = {n for n, p in run["model"].named_parameters() if not torch.equal(p, run["before"][n])}
    assert changed
    for name in changed:
        assert "unipelt_" in name or "modules_to_save" in name, name


def test_saved_adapter_holds_the_folded_prefix(trained):
    run = trained[("SEQ_CLS", "bert")]
    saved = load_file(run["adapter"] / "adapter_model.safetensors")
    assert not any("unipelt_prefix_encoder" in k for k in saved)
    assert not any(".default" in k for k in saved)  # adapter-name free, so it loads under any name
    kv = {k: v for k, v in saved.items() if "unipelt_prefix_kv" in k}
    assert len(kv) == 2 and all(v.shape == (2, 10, 32) for v in kv.values())
    assert json.loads((run["adapter"] / "adapter_config.json").read_text())["peft_type"] == "UNIPELT"
    model = run["model"]
    stored = model.base_model.parameter_counts()["stored"]
    assert sum(v.numel() for k, v in saved.items() if "unipelt_" in k) == stored
    # in-process reload: the folded prefix reproduces the MLP's outputs, and there is no MLP any more
    loaded = PeftModel.from_pretrained(load_base(run["base"], "SEQ_CLS"), run["adapter"])
    assert not hasattr(loaded.base_model, "unipelt_prefix_encoder") or not loaded.base_model.unipelt_prefix_encoder
    assert_same_outputs(run["expected"], outputs_of(loaded, "SEQ_CLS", run["batch"]))
    # the same adapter loaded a second time under another name (PeftModel.load_adapter -> add_adapter path)
    loaded.load_adapter(run["adapter"], adapter_name="again")
    loaded.set_adapter("again")
    assert_same_outputs(run["expected"], outputs_of(loaded, "SEQ_CLS", run["batch"]))
    # loaded as trainable, the folded prefix itself trains
    trainable = PeftModel.from_pretrained(load_base(run["base"], "SEQ_CLS"), run["adapter"], is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "unipelt_prefix_kv" in n)
    assert_same_outputs(run["expected"], outputs_of(trainable, "SEQ_CLS", run["batch"]))


def test_fresh_process_round_trips(trained, tmp_path):
    """One child process loads every saved adapter with PeftModel.from_pretrained and with AutoPeftModelFor*."""
    jobs, expected = [], []
    for (task_type, _family), run in trained.items():
        for loader in ("peft", "auto"):
            jobs.append(
                {
                    "task_type": task_type,
                    "batch": run["batch"],
                    "adapter": run["adapter"],
                    "base": run["base"],
                    "loader": loader,
                }
            )
            expected.append(run["expected"])
    for want, got in zip(expected, outputs_in_one_fresh_process(tmp_path, jobs), strict=True):
        assert_same_outputs(want, got)


def test_second_adapter_and_switching():
    _, model = build("SEQ_CLS", "bert")
    model.add_adapter("other", UniPELTConfig(task_type="SEQ_CLS", components=("adapter", "prefix")))
    randomize_zero_inits(model)
    model.eval()
    batch = make_batch("SEQ_CLS")
    with torch.no_grad():
        first = forward(model, "SEQ_CLS", batch)
        model.set_adapter("other")
        second = forward(model, "SEQ_CLS", batch)
        assert all(not p.requires_grad for n, p in model.named_parameters() if ".default" in n)
        assert any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)
        model.set_adapter("default")
        again = forward(model, "SEQ_CLS", batch)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    model.delete_adapter("other")
    assert not any(".other" in n for n, _ in model.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        _, model = build("CAUSAL_LM", "llama")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        forward_loss = model(**make_batch("CAUSAL_LM")).loss
        forward_loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_roberta_defaults():
    from transformers import RobertaConfig

    config = RobertaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config)
    model = get_peft_model(base, UniPELTConfig(task_type="SEQ_CLS"))
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(UniPELTLoraLinear) == 4 and kinds.count(UniPELTPrefix) == 2
    assert kinds.count(UniPELTAdapterLinear) == 2
    batch = make_batch("SEQ_CLS")
    randomize_zero_inits(model)
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            expected = forward(model, "SEQ_CLS", batch)
        assert not torch.allclose(forward(model, "SEQ_CLS", batch), expected)
        for layer_cls in COMPONENT_LAYER.values():
            set_gates(model, layer_cls, 0.0)
        torch.testing.assert_close(forward(model, "SEQ_CLS", batch), expected, rtol=0, atol=1e-6)


def test_export_is_refused_clearly(tmp_path):
    """There is no stock-PEFT form of UniPELT (gated LoRA cannot be merged; stock PEFT has no gated adapters)."""
    _, model = build("SEQ_CLS", "bert")
    with pytest.raises(ValueError, match="UNIPELT"):
        peftlab.export_adapter(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_cached_beam_search_equals_uncached(family):
    """Beam search reorders the cache rows; the gates' running sums follow them."""
    task_type = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    _, model = build(task_type, family)
    randomize_zero_inits(model)
    model.eval()
    inputs = model_inputs(make_batch(task_type, batch_size=2))
    kwargs = {
        "max_new_tokens": 6,
        "num_beams": 3,
        "do_sample": False,
        "pad_token_id": 0,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    with torch.no_grad():
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=0, atol=1e-6)

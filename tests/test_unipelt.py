"""UniPELT beyond the conformance matrix: config errors, gates, prefix via the attention interface, generation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import (
    AUTO_MODEL,
    TASK_FAMILIES,
    assert_same_outputs,
    load_base,
    make_batch,
    model_inputs,
    outputs_of,
    save_tiny_base,
    tiny_config,
    train_steps,
)
from transformers import AutoModelForSequenceClassification, BertConfig

import peftlab  # noqa: F401
from peftlab import UniPELTConfig
from peftlab.methods.unipelt.gates import Gate
from peftlab.methods.unipelt.layers import UniPELTAdapter, UniPELTLoraLinear, UniPELTPrefix

COMPONENT_LAYER = {"lora": UniPELTLoraLinear, "adapter": UniPELTAdapter, "prefix": UniPELTPrefix}


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
    """LoRA B starts at zero and the adapter's up projection near zero: make every component's effect large."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, UniPELTLoraLinear):
                for up in [*module.unipelt_lora_B.values(), *module.unipelt_lora_B_v.values()]:
                    up.weight.normal_(0, 0.5)
            if isinstance(module, UniPELTAdapter):
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
        ({"adapter_placement": "pfeiffer"}, "adapter_placement"),
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
    assert {UniPELTLoraLinear, UniPELTAdapter, UniPELTPrefix} <= names
    _, ap = build("SEQ_CLS", "bert", components=("adapter", "prefix"))
    assert UniPELTLoraLinear not in {type(m) for m in ap.modules()}
    # the prefix goes on BERT's self-attention, the adapter on the FFN's LayerNorm (not the attention output's)
    body = apl.get_base_model().bert.encoder.layer[0]
    assert isinstance(body.attention.self.gated_prefix, UniPELTPrefix)
    assert isinstance(body.output.LayerNorm.gated_adapter, UniPELTAdapter)
    assert not hasattr(body.attention.output.LayerNorm, "gated_adapter")
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
        # float sums in the attention matmul: equal up to rounding (1e-6 on T5, whose scores are unscaled)
        torch.testing.assert_close(forward(model, task_type, batch), expected, rtol=0, atol=1e-5)


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


# --- trainable tensors, and a trained BERT adapter's saved form -------------------------------------------------------
@pytest.mark.parametrize(("task_type", "family"), TASK_FAMILIES)
def test_only_unipelt_tensors_and_the_head_are_trainable(task_type, family):
    """The matrix's train check asserts that every trainable tensor trains and nothing frozen moves; this names which
    tensors are trainable (a base weight left trainable would pass there)."""
    _, model = build(task_type, family)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if "unipelt_" not in n and "modules_to_save" not in n]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BERT classifier's adapter trained a few steps and saved; its outputs."""
    root = tmp_path_factory.mktemp("unipelt")
    base_path = save_tiny_base(root, "SEQ_CLS", "bert")
    torch.manual_seed(1)
    model = get_peft_model(load_base(base_path, "SEQ_CLS"), UniPELTConfig(task_type="SEQ_CLS"))
    batch = make_batch("SEQ_CLS")
    train_steps(model, batch, steps=6, lr=1e-2)
    adapter = root / "adapter-bert-seq_cls"
    model.save_pretrained(adapter)
    return {
        "model": model,
        "batch": batch,
        "base": base_path,
        "adapter": adapter,
        "expected": outputs_of(model, "SEQ_CLS", batch),
    }


def test_saved_adapter_holds_the_folded_prefix(trained):
    run = trained
    saved = load_file(run["adapter"] / "adapter_model.safetensors")
    assert not any(".default" in k for k in saved)  # adapter-name free, so it loads under any name
    kv = {k: v for k, v in saved.items() if "unipelt_prefix_kv" in k}
    assert len(kv) == 2 and all(v.shape == (2, 10, 32) for v in kv.values())
    assert json.loads((run["adapter"] / "adapter_config.json").read_text())["peft_type"] == "UNIPELT"
    model = run["model"]
    counts = model.base_model.parameter_counts()
    mlp = sum(v.numel() for k, v in saved.items() if ".unipelt_prefix_encoder." in k)
    assert sum(v.numel() for k, v in saved.items() if "unipelt_" in k) == counts["stored"] + mlp
    # in-process reload: the folded prefix reproduces the MLP's outputs, and there is no MLP any more
    loaded = PeftModel.from_pretrained(load_base(run["base"], "SEQ_CLS"), run["adapter"])
    assert not hasattr(loaded.base_model, "unipelt_prefix_encoder") or not loaded.base_model.unipelt_prefix_encoder
    assert_same_outputs(run["expected"], outputs_of(loaded, "SEQ_CLS", run["batch"]))
    # the same adapter loaded a second time under another name (PeftModel.load_adapter -> add_adapter path)
    loaded.load_adapter(run["adapter"], adapter_name="again")
    loaded.set_adapter("again")
    assert_same_outputs(run["expected"], outputs_of(loaded, "SEQ_CLS", run["batch"]))
    # loaded as trainable, the saved MLP trains on (exact resume), the folded copy stays frozen
    trainable = PeftModel.from_pretrained(load_base(run["base"], "SEQ_CLS"), run["adapter"], is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "unipelt_prefix_encoder" in n)
    assert not any(p.requires_grad for n, p in trainable.named_parameters() if "unipelt_prefix_kv" in n)
    assert_same_outputs(run["expected"], outputs_of(trainable, "SEQ_CLS", run["batch"]))
    # an inference-form adapter (no MLP saved) loaded as trainable trains the folded prefix itself
    loaded.save_pretrained(run["adapter"].with_name("inference-form"), selected_adapters=["default"])
    folded = PeftModel.from_pretrained(
        load_base(run["base"], "SEQ_CLS"), run["adapter"].with_name("inference-form"), is_trainable=True
    )
    assert all(p.requires_grad for n, p in folded.named_parameters() if "unipelt_prefix_kv" in n)
    assert not getattr(folded.base_model, "unipelt_prefix_encoder", None)
    assert_same_outputs(run["expected"], outputs_of(folded, "SEQ_CLS", run["batch"]))


def test_second_adapter_of_other_components_and_switching():
    """Beyond the matrix's adapters check: a second adapter with other components, and which one's tensors train."""
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


GC_FAMILIES = [("SEQ_CLS", "bert"), ("CAUSAL_LM", "gpt2"), ("CAUSAL_LM", "llama"), ("SEQ_2_SEQ_LM", "t5")]


def losses_and_grads(model, batch: dict, steps: int = 2) -> tuple[list[torch.Tensor], list[dict]]:
    """Losses and gradients of a few AdamW steps (dropout seeded per step): the second step is the one that met a
    prefix MLP output left over from the first."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(("task_type", "family"), GC_FAMILIES)
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(task_type, family, reentrant):
    """Every checkpointed layer computes its own prefix keys/values, also when backward reruns its forward."""
    batch = make_batch(task_type)
    runs = []
    for checkpointing in (False, True):
        _, model = build(task_type, family)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        runs.append(losses_and_grads(model, batch))
    (losses, grads), (gc_losses, gc_grads) = runs
    assert any(".unipelt_prefix_encoder." in n for n in grads[0])
    for step, (want, got) in enumerate(zip(grads, gc_grads, strict=True)):
        # equal up to float rounding: under reentrant checkpointing T5's gradients differ in the last bits (seen here)
        torch.testing.assert_close(gc_losses[step], losses[step], rtol=1e-6, atol=1e-7, msg=f"step {step}")
        assert want.keys() == got.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")


@pytest.mark.parametrize(("task_type", "family"), [("SEQ_CLS", "bert"), ("CAUSAL_LM", "llama")])
def test_no_gate_ablation_trains_with_a_prefix(task_type, family):
    """use_gates=False: no gate (and no stack hook) refreshes anything; each step uses the current MLP weights."""
    _, model = build(task_type, family, use_gates=False)
    assert not any(isinstance(m, Gate) for m in model.modules())
    mlp = model.base_model.unipelt_prefix_encoder["default"]
    before = mlp.down.weight.detach().clone()
    losses, grads = losses_and_grads(model, make_batch(task_type), steps=3)
    assert all(any(".unipelt_prefix_encoder." in n for n in g) for g in grads)
    assert not torch.equal(mlp.down.weight, before)
    # evaluation follows the trained MLP (no stale keys/values from before the last step)
    model.eval()
    with torch.no_grad():
        first = forward(model, task_type, make_batch(task_type))
        mlp.down.weight.add_(0.5)
        assert not torch.allclose(forward(model, task_type, make_batch(task_type)), first)


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
    assert kinds.count(UniPELTAdapter) == 2
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


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_disabled_adapter_generates_like_the_base_model(family):
    """Under disable_adapter(), cached and uncached generation equal the untouched base model's."""
    import copy

    task_type = "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"
    torch.manual_seed(0)
    base = AUTO_MODEL[task_type].from_config(tiny_config(family), attn_implementation="sdpa")
    reference = copy.deepcopy(base).eval()
    model = get_peft_model(base, UniPELTConfig(task_type=task_type))
    randomize_zero_inits(model)
    model.eval()
    batch = make_batch(task_type)
    inputs = model_inputs(batch)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected_logits = forward(reference, task_type, batch)
        with model.disable_adapter():
            torch.testing.assert_close(forward(model, task_type, batch), expected_logits, rtol=0, atol=0)
            for use_cache in (True, False):
                want = reference.generate(**inputs, use_cache=use_cache, **kwargs)
                assert torch.equal(model.generate(**inputs, use_cache=use_cache, **kwargs), want), use_cache
            beams = {"num_beams": 3, **kwargs}
            assert torch.equal(model.generate(**inputs, **beams), reference.generate(**inputs, **beams))
        # and the adapter is back afterwards, cached still equal to uncached
        assert not torch.allclose(forward(model, task_type, batch), expected_logits)
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **kwargs))


def test_inference_load_of_a_training_checkpoint_builds_no_mlp(trained, tmp_path):
    """A trainable model's save holds the MLP too; an inference load ignores it, and saves the small form."""
    run = trained
    saved = load_file(run["adapter"] / "adapter_model.safetensors")
    assert any(".unipelt_prefix_encoder." in k for k in saved)
    loaded = PeftModel.from_pretrained(load_base(run["base"], "SEQ_CLS"), run["adapter"])
    assert not getattr(loaded.base_model, "unipelt_prefix_encoder", None)
    loaded.save_pretrained(tmp_path / "small")
    small = load_file(tmp_path / "small" / "adapter_model.safetensors")
    assert not any("unipelt_prefix_encoder" in k for k in small)
    assert (
        sum(v.numel() for k, v in small.items() if "unipelt_" in k)
        == run["model"].base_model.parameter_counts()["stored"]
    )


def test_eager_models_without_a_module_level_eager_function_are_untouched():
    """The wrapped attention dispatch passes a module without a prefix to the model's OWN eager function."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class HomeMadeAttention(LlamaAttention):  # defined in a module that has no `eager_attention_forward`
        pass

    build("CAUSAL_LM", "llama", attn="eager")  # a UniPELT model exists in this process
    torch.manual_seed(0)
    stock = AUTO_MODEL["CAUSAL_LM"].from_config(tiny_config("llama"), attn_implementation="eager").eval()
    inputs = model_inputs(make_batch("CAUSAL_LM"))
    with torch.no_grad():
        expected = stock(**inputs).logits
        for layer in stock.model.layers:
            layer.self_attn.__class__ = HomeMadeAttention
        torch.testing.assert_close(stock(**inputs).logits, expected, rtol=0, atol=0)


def test_official_adapter_placement_and_init():
    """BERT (post-LN): out = LN(h + x + G A(LN(h + x))); LLaMA (pre-LN): layer output z + G A(z); N(0, 0.02) inits."""
    batch = make_batch("SEQ_CLS")
    _, model = build("SEQ_CLS", "bert", attn="eager", components=("adapter",))
    randomize_zero_inits(model)
    model.eval()
    out_module = model.get_base_model().bert.encoder.layer[0].output
    captured = {}
    out_module.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
    with torch.no_grad():
        model(**model_inputs(batch))
        intermediate, attention_output = captured["args"]
        z = out_module.dense(intermediate) + attention_output
        y = out_module.LayerNorm.forward(z)
        adapter = out_module.LayerNorm.gated_adapter
        gate = adapter.unipelt_adapter_gate["default"](y)
        bottleneck = adapter.activation["default"](adapter.unipelt_adapter_down["default"](y))
        expected = out_module.LayerNorm.forward(z + gate * adapter.unipelt_adapter_up["default"](bottleneck))
    torch.testing.assert_close(captured["out"], expected, rtol=1e-6, atol=1e-6)

    _, llama = build("CAUSAL_LM", "llama", components=("adapter",))
    randomize_zero_inits(llama)
    llama.eval()
    layer = llama.get_base_model().model.layers[0]
    assert isinstance(layer.gated_adapter, UniPELTAdapter) and not layer.gated_adapter.post_norm
    seen = {}
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    layer.mlp.register_forward_hook(lambda m, args, out: seen.update(h=out))
    layer.register_forward_hook(lambda m, args, out: seen.update(out=out))  # runs after the adapter's hook
    with torch.no_grad():
        llama(**model_inputs(make_batch("CAUSAL_LM")))
        z = seen["x"] + seen["h"]
        adapter = layer.gated_adapter
        update = adapter.unipelt_adapter_up["default"](
            adapter.activation["default"](adapter.unipelt_adapter_down["default"](z))
        )
        expected = z + adapter.unipelt_adapter_gate["default"](z) * update
    torch.testing.assert_close(seen["out"], expected, rtol=1e-6, atol=1e-6)

    # official init: N(0, 0.02) weights, zero biases (gates, adapter projections, prefix embedding and MLP)
    _, big = build("SEQ_CLS", "bert")
    checked = 0
    for name, param in big.named_parameters():
        if "unipelt_lora_" in name and "gate" not in name:
            continue
        if "unipelt_" in name and "prefix_kv" not in name:
            if name.endswith("bias"):
                assert torch.count_nonzero(param) == 0, name
            elif param.numel() >= 32:
                assert abs(param.std().item() - 0.02) < 0.01 and abs(param.mean().item()) < 0.01, name
                checked += 1
    assert checked >= 10


def test_ffn_output_placement_is_the_documented_option():
    _, model = build("SEQ_CLS", "bert", adapter_placement="ffn_output")
    body = model.get_base_model().bert.encoder.layer[0]
    assert isinstance(body.output.dense.gated_adapter, UniPELTAdapter)
    assert not hasattr(body.output.LayerNorm, "gated_adapter")
    _, llama = build("CAUSAL_LM", "llama", adapter_placement="ffn_output")
    assert hasattr(llama.get_base_model().model.layers[0].mlp.down_proj, "gated_adapter")
    with pytest.raises(ValueError, match="adapter_placement"):
        UniPELTConfig(task_type="SEQ_CLS", adapter_placement="after_attention")


def test_earlier_adapter_format_loads_and_mismatched_weights_are_refused(tmp_path):
    """Adapters saved when the adapter replaced the feed-forward linear (keys without `gated_adapter.`) still load
    (their config names that linear); weights that fit no module after a config edit fail clearly."""
    base_path = save_tiny_base(tmp_path, "SEQ_CLS", "bert")
    batch = make_batch("SEQ_CLS")
    torch.manual_seed(0)
    config = UniPELTConfig(task_type="SEQ_CLS", adapter_placement="ffn_output")
    model = get_peft_model(load_base(base_path, "SEQ_CLS"), config)
    randomize_zero_inits(model)
    expected = outputs_of(model, "SEQ_CLS", batch)
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    saved = load_file(weights)
    assert any(".output.dense.gated_adapter.unipelt_adapter_up." in k for k in saved)
    old = {k.replace(".gated_adapter.", "."): v for k, v in saved.items()}
    config_file = tmp_path / "adapter" / "adapter_config.json"
    old_config = json.loads(config_file.read_text())
    del old_config["adapter_placement"]  # the field did not exist; the resolved targets were saved
    save_file(old, weights)
    config_file.write_text(json.dumps(old_config))
    loaded = PeftModel.from_pretrained(load_base(base_path, "SEQ_CLS"), tmp_path / "adapter")
    assert_same_outputs(expected, outputs_of(loaded, "SEQ_CLS", batch))

    old_config["adapter_target_modules"] = r".*\.layer\.\d+\.output\.LayerNorm"  # not where the weights sit
    config_file.write_text(json.dumps(old_config))
    with pytest.raises(ValueError, match="do not fit the model"):
        PeftModel.from_pretrained(load_base(base_path, "SEQ_CLS"), tmp_path / "adapter")

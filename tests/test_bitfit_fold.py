"""BitFit norm biases folded into the linear layers after them: the fold table against the modeling code, the default
selection, exports of LLaMA-family models loaded without peftlab, and the norms that cannot be folded."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import get_peft_model
from tiny import VOCAB, assert_same_outputs, make_batch, outputs_in_one_fresh_process, outputs_of, train_steps
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM

import peftlab
from peftlab import BitFitConfig
from peftlab.methods.bitfit.fold import NORM_CONSUMERS, fold_plan
from peftlab.methods.bitfit.layer import is_norm_layer


def tiny_decoder(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A random 2-layer causal LM of a LLaMA-like family, built from its config."""
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


class _Uses(TorchFunctionMode):
    """Records every torch call that reads a tracked tensor, with the module running at the time."""

    # attributes that read a tensor's metadata, not its values
    METADATA = (torch.Tensor.shape, torch.Tensor.dtype, torch.Tensor.device)

    def __init__(self, tracked: dict[str, torch.Tensor], stack: list[str]) -> None:
        super().__init__()
        self.tracked, self.stack, self.uses = tracked, stack, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) not in self.METADATA:
            for leaf in tree_flatten((args, kwargs))[0]:
                self.uses |= {(name, func.__name__, self.stack[-1]) for name, t in self.tracked.items() if leaf is t}
        return func(*args, **kwargs)


def norm_output_uses(model: nn.Module) -> dict[str, set[tuple[str, str]]]:
    """norm name -> {(torch function, module calling it)} for every use of the norm's output in one forward."""
    tracked: dict[str, torch.Tensor] = {}
    stack = [""]
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda _m, _a, name=name: stack.append(name) and None)
        module.register_forward_hook(lambda *_: stack.pop() and None)
        if is_norm_layer(module):
            module.register_forward_hook(lambda _m, _a, out, name=name: tracked.__setitem__(name, out), prepend=True)
    mode = _Uses(tracked, stack)
    with torch.no_grad(), mode:
        model.eval()(input_ids=torch.tensor([[3, 4, 5, 6]]))
    uses: dict[str, set[tuple[str, str]]] = {name: set() for name in tracked}
    for name, func, caller in mode.uses:
        uses[name].add((func, caller))
    return uses


@pytest.mark.parametrize("model_type", sorted(NORM_CONSUMERS))
def test_fold_table_matches_the_modeling_code(model_type):
    """Traced: a norm is foldable exactly when its output is read by F.linear in plain Linear layers only, and
    those layers are the consumers the table names."""
    model = tiny_decoder(model_type)
    linears = {name for name, module in model.named_modules() if type(module) is nn.Linear}
    uses = norm_output_uses(model)
    assert uses and all(uses.values())  # every norm ran and its output was read
    for name, used in uses.items():
        consumers, reason = fold_plan(model, name)
        only_linears = all(func == "linear" and caller in linears for func, caller in used)
        assert (reason is None) == only_linears, (name, used, reason)
        if reason is None:
            assert used == {("linear", consumer) for consumer in consumers}, name
    assert fold_plan(model, "model.norm")[1] is not None  # the final norm feeds the LM head through a slice


@pytest.mark.parametrize(
    ("model_type", "left_out"),
    [("llama", {"model.norm"}), ("qwen3", {"model.norm", "self_attn.q_norm", "self_attn.k_norm"})],
)
def test_default_selection_keeps_only_foldable_norms(model_type, left_out):
    model = tiny_decoder(model_type)
    norms = {name for name, module in model.named_modules() if is_norm_layer(module)}
    peft_model = get_peft_model(model, BitFitConfig(task_type="CAUSAL_LM"))
    selected = set(peft_model.peft_config["default"].target_modules)
    assert {re.sub(r"^model\.layers\.\d+\.", "", name) for name in norms - selected} == left_out
    assert {name.rsplit(".", 1)[-1] for name in norms & selected} == {"input_layernorm", "post_attention_layernorm"}


# (model type, config overrides, bias_terms, config flags the export must switch on)
EXPORTS = [
    # Qwen2's q/k/v have biases: the input norm's bias folds into them and no flag is needed
    ("qwen2", {}, ["input_layernorm", "q_proj", "k_proj", "v_proj"], []),
    # an RMSNorm alone: its consumers are not BitFit layers and get biases through the config's switch
    ("qwen3", {}, ["input_layernorm"], ["attention_bias"]),
    ("llama", {}, ["post_attention_layernorm"], ["mlp_bias"]),
    # both norms of every layer and the MLP, with the attention layers' biases already in the base model
    ("llama", {"attention_bias": True}, ["input_layernorm", "post_attention_layernorm", r".*\.mlp\..*"], ["mlp_bias"]),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> list[dict]:
    """Each EXPORTS case trained a few steps (so the biases are non-zero), exported, and loaded in ONE fresh process
    without peftlab."""
    tmp = tmp_path_factory.mktemp("fold")
    batch = make_batch("CAUSAL_LM")
    runs, jobs = [], []
    for i, (model_type, overrides, bias_terms, _) in enumerate(EXPORTS):
        model = get_peft_model(
            tiny_decoder(model_type, **overrides), BitFitConfig(task_type="CAUSAL_LM", bias_terms=bias_terms)
        )
        losses = train_steps(model, batch)
        path = peftlab.export_adapter(model, tmp / f"export-{i}")
        runs.append({"model": model, "losses": losses, "trained": outputs_of(model, "CAUSAL_LM", batch), "path": path})
        jobs.append({"task_type": "CAUSAL_LM", "batch": batch, "adapter": path, "loader": "transformers"})
    for run, loaded in zip(runs, outputs_in_one_fresh_process(tmp, jobs, import_peftlab=False), strict=True):
        run["loaded"] = loaded
    return runs


@pytest.mark.parametrize("index", range(len(EXPORTS)), ids=[f"{c[0]}-{'-'.join(c[2])}" for c in EXPORTS])
def test_folded_export_loads_without_peftlab_with_the_same_outputs(exports, index):
    model_type, _, _, flags = EXPORTS[index]
    run = exports[index]
    assert run["losses"][-1] < run["losses"][0]
    norm_deltas = [p for name, p in run["model"].named_parameters() if "layernorm.bitfit_bias" in name]
    assert norm_deltas and all(p.abs().max() > 1e-3 for p in norm_deltas)  # trained: the fold has something to do
    assert_same_outputs(run["trained"], run["loaded"], atol=1e-6)
    config = json.loads((run["path"] / "config.json").read_text())
    assert config["model_type"] == model_type and all(config[flag] is True for flag in flags)
    assert "bitfit" not in (run["path"] / "config.json").read_text()


def test_export_refuses_a_norm_that_does_not_fold(tmp_path):
    model = get_peft_model(tiny_decoder("llama"), BitFitConfig(task_type="CAUSAL_LM", bias_terms=["norm", "q_proj"]))
    assert "model.norm" in model.peft_config["default"].target_modules  # selectable on request
    reason = r"model\.norm \(LlamaRMSNorm\): in llama a norm's output does not feed linear layers only"
    with pytest.raises(ValueError, match=reason):
        peftlab.export_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_folds_into_layers_without_a_bias_switch(tmp_path):
    """Qwen2 has no option for MLP biases: the post-attention norm's bias (folded into gate/up) has no place."""
    model = get_peft_model(tiny_decoder("qwen2"), BitFitConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=r"cannot be exported as a stock Qwen2ForCausalLM.*folded in") as error:
        peftlab.export_adapter(model, tmp_path / "out")
    assert "model.layers.0.self_attn.o_proj (Linear)" in str(error.value)
    assert "model.layers.0.mlp.gate_proj (Linear)" in str(error.value)


class _ScaledLinear(nn.Linear):
    """A Linear subclass that computes something else: not a plain Linear, so no fold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("change", "norm", "reason"),
    [
        ("share the consumer", "model.layers.1.input_layernorm", "q_proj is shared with other places"),
        ("share the norm", "model.layers.1.input_layernorm", "the norm is shared by several places"),
        ("subclass the consumer", "model.layers.0.post_attention_layernorm", "up_proj is a _ScaledLinear, not a plain"),
    ],
)
def test_shared_or_non_plain_consumers_do_not_fold(change, norm, reason):
    model = tiny_decoder("llama")
    first, second = model.model.layers
    if change == "share the consumer":
        second.self_attn.q_proj = first.self_attn.q_proj
    elif change == "share the norm":
        second.input_layernorm = first.input_layernorm
    else:
        first.mlp.up_proj = _ScaledLinear(32, 64, bias=False)
    consumers, why = fold_plan(model, norm)
    assert consumers == [] and reason in why
    selected = get_peft_model(copy.deepcopy(model), BitFitConfig(task_type="CAUSAL_LM")).peft_config["default"]
    assert norm not in selected.target_modules  # left out of the default selection

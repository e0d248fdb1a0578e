"""UniPELTModel: the PEFT tuner that injects gated LoRA, gated prefix and gated adapters, and wires the gates."""

from __future__ import annotations

import inspect
import re

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.methods.unipelt.attention import SUPPORTED_ATTENTION, attention_post_hook, attention_pre_hook
from peftlab.methods.unipelt.config import DEFAULT_TARGETS, UniPELTConfig, matches
from peftlab.methods.unipelt.gates import Gate, GateContext, install_stack_hooks
from peftlab.methods.unipelt.layers import (
    ADAPTER_CHILD,
    MERGE_REFUSED,
    PREFIX_CHILD,
    PrefixEncoder,
    UniPELTAdapter,
    UniPELTLayer,
    UniPELTLoraLinear,
    UniPELTPrefix,
    adapter_hook,
    linear_features,
)

ENCODER_ATTR = "unipelt_prefix_encoder"
# adapter keys of the earlier format, where the adapter replaced the linear: `...output.dense.unipelt_adapter_down...`
_LEGACY_ADAPTER = re.compile(rf"(?<!\.{ADAPTER_CHILD})\.(unipelt_adapter_)")
_FIELDS = {
    "lora": "lora_target_modules",
    "prefix": "prefix_target_modules",
    "adapter": "adapter_target_modules",
}


def attention_geometry(module: nn.Module) -> tuple[int, int, int] | None:
    """(hidden_size, key/value heads, head_dim) of a BERT/GPT-2/LLaMA/T5-style attention module, else None."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    head_dim = next(
        (getattr(module, a) for a in ("head_dim", "attention_head_size", "key_value_proj_dim") if hasattr(module, a)),
        None,
    )
    heads = next(
        (getattr(module, a) for a in ("num_attention_heads", "num_heads", "n_heads") if hasattr(module, a)),
        None,
    )
    if heads is None and hasattr(module, "num_key_value_groups"):
        heads = config.num_attention_heads
    if head_dim is None or heads is None:
        return None
    kv_heads = heads // getattr(module, "num_key_value_groups", 1)
    hidden = getattr(config, "hidden_size", None) or config.d_model
    return hidden, kv_heads, head_dim


def _is_stack(module: nn.Module) -> bool:
    """A transformer body whose forward receives the 2-D attention mask (BertModel, GPT2Model, LlamaModel, T5Stack)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in parameters and ("input_ids" in parameters or "inputs_embeds" in parameters)


class UniPELTModel(BaseTuner):
    """Tuner for `UniPELTConfig` (see the config for the method and `layers.py` for where each component sits)."""

    prefix: str = "unipelt_"
    uses_shared_state = True  # the prefix MLP is shared by all layers and lives on the tuner
    tuner_layer_cls = UniPELTLayer
    target_module_mapping: dict = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict=None,
    ) -> None:
        """Validate and resolve targets first, then PEFT's injection, then the shared prefix MLP and the gates.

        (`PeftModel.add_adapter` / `load_adapter` call this directly, without BaseTuner's pre/post-injection hooks.)
        """
        config = self.peft_config[adapter_name]
        self._resolve_targets(model, config)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._current_targets = {}
        self._finish_injection(model, config, adapter_name)

    # ---- targets -------------------------------------------------------------------------------------------------
    def _resolve_targets(self, model: nn.Module, config: UniPELTConfig) -> None:
        """Resolve and validate every component's targets before anything is changed (cheap: one module scan)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = DEFAULT_TARGETS.get(model_type, {})
        for component in config.components:
            field = _FIELDS[component]
            if getattr(config, field) is None:
                if component not in defaults:
                    raise ValueError(
                        f"{field}: no default for model type {model_type!r} (defaults exist for "
                        f"{sorted(DEFAULT_TARGETS)}); pass module names or a regex"
                    )
                default = defaults[component]
                setattr(config, field, default[config.adapter_placement] if component == "adapter" else default)
        if config.lora_fused_qkv is None:
            config.lora_fused_qkv = bool(defaults.get("fused_qkv", False))

        targets: dict[str, str] = {}
        modules = dict(model.named_modules())
        for component in config.components:
            field = _FIELDS[component]
            patterns = getattr(config, field)
            found = [k for k in modules if k and matches(patterns, k) and not self._excluded(config, k)]
            if not found:
                raise ValueError(f"{field}={patterns!r} matches no module of this {type(model).__name__}")
            for key in found:
                if key in targets:
                    raise ValueError(f"{field}: module {key!r} is already targeted by {_FIELDS[targets[key]]}")
                self._check_target(config, component, key, modules[key])
                targets[key] = component
        self._current_targets = targets

    @staticmethod
    def _excluded(config: UniPELTConfig, key: str) -> bool:
        return config.exclude_modules is not None and matches(config.exclude_modules, key)

    @staticmethod
    def _check_target(config: UniPELTConfig, component: str, key: str, module: nn.Module) -> None:
        field = _FIELDS[component]
        if component == "prefix":
            if attention_geometry(module) is None:
                raise ValueError(f"{field}: {key!r} ({type(module).__name__}) is not a supported attention module")
            implementation = module.config._attn_implementation
            if implementation not in SUPPORTED_ATTENTION:
                raise ValueError(
                    f"UniPELT's prefix needs attn_implementation in {SUPPORTED_ATTENTION}; {key!r} uses "
                    f"{implementation!r}. Load the model with attn_implementation='sdpa' (or 'eager')."
                )
            if implementation == "eager" and getattr(module.config, "reorder_and_upcast_attn", False):
                raise ValueError(
                    "UniPELT's prefix cannot be applied with GPT-2's reorder_and_upcast_attn=True under eager "
                    "attention (that path bypasses the attention interface); use sdpa or turn the option off"
                )
            return
        if component == "adapter":
            if attention_geometry(module) is not None:
                raise ValueError(
                    f"{field}: {key!r} ({type(module).__name__}) is an attention module; the adapter goes after a "
                    "feed-forward block (its LayerNorm in post-LN models, the layer output in pre-LN models)"
                )
            return
        if not isinstance(module, (nn.Linear, Conv1D, UniPELTLoraLinear)):
            raise ValueError(f"{field}: {key!r} is a {type(module).__name__}, not a Linear/Conv1D layer")
        if component == "lora" and config.lora_fused_qkv:
            in_features, out_features = linear_features(getattr(module, "base_layer", module))
            if out_features != 3 * in_features:
                raise ValueError(
                    f"lora_fused_qkv=True needs fused [q; k; v] projections (out = 3 x in); {key!r} maps "
                    f"{in_features} -> {out_features}"
                )

    def _prepare_adapter_config(self, peft_config: UniPELTConfig, model_config: dict) -> UniPELTConfig:
        return peft_config

    def _check_target_module_exists(self, peft_config: UniPELTConfig, key: str) -> bool:
        return key in self._current_targets

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        component = self._current_targets[current_key]
        if component == "prefix":
            child = getattr(target, PREFIX_CHILD, None)
            if child is None:
                hidden, kv_heads, head_dim = attention_geometry(target)
                child = UniPELTPrefix(hidden, kv_heads, head_dim, adapter_name, config)
                child.to(next(target.parameters()).device)
                target.add_module(PREFIX_CHILD, child)
                self._hooks().extend(
                    [
                        target.register_forward_pre_hook(attention_pre_hook, with_kwargs=True),
                        target.register_forward_hook(attention_post_hook, with_kwargs=True),
                    ]
                )
            else:
                child.update_layer(adapter_name, config)
            return
        if component == "adapter":
            child = getattr(target, ADAPTER_CHILD, None)
            if child is None:
                post_norm = isinstance(target, nn.LayerNorm)
                child = UniPELTAdapter(self._adapter_width(target), post_norm, adapter_name, config)
                child.to(next(target.parameters()).device)
                if adapter_name not in self.active_adapters:
                    child.set_adapter(self.active_adapters)
                target.add_module(ADAPTER_CHILD, child)
                self._hooks().append(target.register_forward_hook(adapter_hook))
            else:
                child.update_layer(adapter_name, config)
            return
        if isinstance(target, UniPELTLoraLinear):
            target.update_layer(adapter_name, config)
            return
        new = UniPELTLoraLinear(target, adapter_name, config, fused_qkv=config.lora_fused_qkv)
        if adapter_name not in self.active_adapters:
            new.set_adapter(self.active_adapters)
        self._replace_module(parent, target_name, new, target)

    def _adapter_width(self, target: nn.Module) -> int:
        """The adapter's input/output size: a Linear's output, a LayerNorm's size, else the model's hidden size."""
        if isinstance(target, (nn.Linear, Conv1D)):
            return linear_features(target)[1]
        if isinstance(target, nn.LayerNorm):
            return target.normalized_shape[-1]
        return self.model.config.hidden_size

    def _hooks(self) -> list:
        if "_hook_handles" not in self.__dict__:
            self._hook_handles = []
        return self._hook_handles

    # ---- after injection: shared prefix MLP, gate contexts -------------------------------------------------------
    def _finish_injection(self, model: nn.Module, config: UniPELTConfig, adapter_name: str) -> None:
        prefixes = [m for m in model.modules() if isinstance(m, UniPELTPrefix) and adapter_name in m.unipelt_prefix_kv]
        if prefixes and not config.inference_mode:
            hidden = prefixes[0].hidden_size
            encoder = PrefixEncoder(
                config.prefix_length, hidden, config.prefix_hidden_size, [p.kv_dim for p in prefixes]
            ).to(prefixes[0].unipelt_prefix_kv[adapter_name].device)
            if ENCODER_ATTR not in self._modules:
                self.unipelt_prefix_encoder = nn.ModuleDict()
            self.unipelt_prefix_encoder[adapter_name] = encoder
            encoder.requires_grad_(adapter_name in self.active_adapters)
            for index, prefix in enumerate(prefixes):
                prefix.encoders[adapter_name] = (encoder, index)
                prefix.set_adapter(prefix.active_adapters)
        self._wire_gates(model)

    def _wire_gates(self, model: nn.Module) -> None:
        """Give every gate its key and the context of the transformer stack it sits in (hooks installed once)."""
        if "_contexts" not in self.__dict__:
            self._contexts: dict[str, GateContext] = {}
        stacks = {name: module for name, module in model.named_modules() if name and _is_stack(module)}
        if not stacks:
            stacks = {"": model}
        for name, gate in model.named_modules():
            if not isinstance(gate, Gate):
                continue
            owners = [s for s in stacks if s == "" or name.startswith(s + ".")]
            stack_name = max(owners, key=len) if owners else ""
            if stack_name not in self._contexts:
                stack = stacks.get(stack_name, model)
                causal = any(getattr(m, "is_causal", False) is True for m in stack.modules())
                context = GateContext(stack_name, causal)
                self._hooks().extend(install_stack_hooks(stack, context))
                self._contexts[stack_name] = context
            gate.context = self._contexts[stack_name]
            gate.key = name

    # ---- adapters: activation, trainability, deletion --------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, encoder in getattr(self, "unipelt_prefix_encoder", {}).items():
            encoder.requires_grad_(name in active and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        encoders = getattr(self, "unipelt_prefix_encoder", None)
        if encoders is not None and adapter_name in encoders:
            del encoders[adapter_name]

    def fold_prefix(self, adapter_name: str) -> None:
        """Store the MLP's prefix keys/values in the prefix parameters and drop the MLP (inference form)."""
        trainable = False
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, UniPELTPrefix) and adapter_name in module.encoders:
                    module.unipelt_prefix_kv[adapter_name].copy_(module.key_values(adapter_name))
                    trainable = module.unipelt_prefix_kv[adapter_name].requires_grad or any(
                        p.requires_grad for p in module.encoders[adapter_name][0].parameters()
                    )
                    del module.encoders[adapter_name]
                    module.unipelt_prefix_kv[adapter_name].requires_grad_(trainable)
        encoders = getattr(self, "unipelt_prefix_encoder", None)
        if encoders is not None and adapter_name in encoders:
            del encoders[adapter_name]

    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """{"trainable": while training (MLP, not the folded prefix), "stored": in the saved adapter (folded prefix)}.

        Both count UniPELT's own parameters only (not a task head in modules_to_save).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        stored = sum(m._adapter_numel(adapter_name) for m in self.model.modules() if isinstance(m, UniPELTLayer))
        trainable = stored
        encoders = getattr(self, "unipelt_prefix_encoder", {})
        if adapter_name in encoders:
            trainable += sum(p.numel() for p in encoders[adapter_name].parameters())
            trainable -= sum(
                m.unipelt_prefix_kv[adapter_name].numel()
                for m in self.model.modules()
                if isinstance(m, UniPELTPrefix) and adapter_name in m.unipelt_prefix_kv
            )
        return {"trainable": trainable, "stored": stored}

    # ---- merging is impossible; unloading removes everything --------------------------------------------------------
    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSED)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            raise ValueError(MERGE_REFUSED)
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        for handle in self._hooks():
            handle.remove()
        self._hook_handles = []
        self._contexts = {}
        for module in model.modules():
            for child, kind in ((PREFIX_CHILD, UniPELTPrefix), (ADAPTER_CHILD, UniPELTAdapter)):
                if isinstance(getattr(module, child, None), kind):
                    delattr(module, child)
        return model

    # ---- saving the folded prefix (and, while training, the MLP); loading either ----------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The folded prefix keys/values, which is all inference needs; while the MLP exists (a trainable adapter) also
        the MLP's weights (`unipelt_prefix_encoder.*`), so that training resumes exactly from a checkpoint
        (`Trainer(resume_from_checkpoint=...)`)."""
        to_return = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, UniPELTPrefix) and adapter_name in module.unipelt_prefix_kv:
                    key = f"{name}.unipelt_prefix_kv.{adapter_name}"
                    if key in to_return:
                        to_return[key] = module.key_values(adapter_name).detach().clone()
        return to_return

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`...unipelt_prefix_encoder.<adapter>.up.0.weight` -> `...unipelt_prefix_encoder.up.0.weight` (the stock
        rule only strips the adapter name right before the last dot)."""
        marker = f"{ENCODER_ATTR}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{ENCODER_ATTR}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """A trainable model with the MLP takes the saved MLP if there is one (exact resume); otherwise the adapter uses
        the folded prefix directly (inference loads never build the MLP; a trainable load of an inference-form
        adapter trains the folded prefix). Adapters saved before the adapter became a `gated_adapter` child (it then
        replaced the feed-forward linear, which the saved config still targets) load unchanged. Saved UniPELT weights
        that fit no module are refused."""
        tuners = [m for m in model.modules() if isinstance(m, UniPELTModel)]
        has_mlp = any(adapter_name in getattr(t, ENCODER_ATTR, {}) for t in tuners)
        saved_mlp = any(f".{ENCODER_ATTR}." in k for k in state_dict)
        if not (has_mlp and saved_mlp):
            state_dict = {k: v for k, v in state_dict.items() if f".{ENCODER_ATTR}." not in k}
            if any(".unipelt_prefix_kv" in k for k in state_dict):
                for tuner in tuners:
                    tuner.fold_prefix(adapter_name)
        state_dict = {_LEGACY_ADAPTER.sub(rf".{ADAPTER_CHILD}.\1", k): v for k, v in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        own = model.state_dict()
        if has_mlp and saved_mlp:
            # while the MLP exists the folded keys/values are derived from it at save time; the model's own (unused)
            # copy stays as it is, so a resumed model equals the uninterrupted one tensor for tensor
            remapped.update({k: own[k] for k in remapped if ".unipelt_prefix_kv." in k and k in own})
        stray = sorted(k for k in remapped if "unipelt_" in k and k not in own)
        if stray:
            raise ValueError(
                f"this UniPELT adapter's saved weights do not fit the model built from its config (e.g. {stray[0]!r} "
                "has no module): the config's target modules or adapter_placement differ from those it was saved with"
            )
        return remapped

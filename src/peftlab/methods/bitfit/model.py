"""BitFitModel: the PEFT tuner that wraps the selected layers in `BitFitLayer`s."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from peftlab.methods.bitfit.config import BitFitConfig
from peftlab.methods.bitfit.layer import BitFitLayer, can_merge
from peftlab.methods.bitfit.selection import resolve_targets


class BitFitModel(BaseTuner):
    """Trains bias terms only: each selected layer gets a zero-initialised bias delta per adapter.

    Layers are chosen by `BitFitConfig.bias_terms` when the model is wrapped; the chosen names are stored in
    `target_modules`, so the saved adapter reloads onto exactly the same layers.
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BitFitLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: BitFitConfig, model_config: dict) -> BitFitConfig:
        # the layers are resolved in `_prepare_model`, which sees the model (stock PEFT wants a per-type table here)
        return peft_config

    def _prepare_model(self, peft_config: BitFitConfig, model: nn.Module) -> None:
        peft_config.target_modules = resolve_targets(model, peft_config)

    def _create_and_replace(
        self,
        peft_config: BitFitConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, BitFitLayer):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode)
            return
        new_module = BitFitLayer(target, adapter_name, inference_mode=peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        # the delta was already put on the base layer's device; PEFT's _replace_module also needs a weight to exist
        setattr(parent, target_name, new_module)

    def _check_merge_allowed(self) -> None:
        """Refuse to merge before touching any layer if some active delta sits on a layer that cannot hold a bias."""
        super()._check_merge_allowed()
        blocked = [
            f"{name} ({type(module.get_base_layer()).__name__})"
            for name, module in self.model.named_modules()
            if isinstance(module, BitFitLayer)
            and not can_merge(module.get_base_layer())
            and any(adapter in module.bitfit_bias for adapter in module.active_adapters)
        ]
        if blocked:
            shown = ", ".join(blocked[:8]) + (f", ... ({len(blocked)} layers)" if len(blocked) > 8 else "")
            raise ValueError(
                f"cannot merge the BitFit adapter: these layers have no bias for it and their type cannot hold one: "
                f"{shown}. Keep the adapter unmerged (peftlab.export_adapter folds a norm's bias into the linear "
                "layers it feeds, where the model allows), or train without such layers (add_missing_biases=False, "
                "exclude_modules or bias_terms)."
            )

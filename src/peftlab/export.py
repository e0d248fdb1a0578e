"""`export_adapter`: write a trained peftlab model in the closest stock form, loadable without peftlab.

Each method registers its own exporter (in its folder); this module only dispatches and makes the write atomic,
so that a failed export never leaves a half-written folder or touches what is already at `path`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peft import PeftModel
from peft.utils import PeftType

from peftlab.staging import staged_folder

Exporter = Callable[[PeftModel, str, Path], None]
_EXPORTERS: dict[PeftType, Exporter] = {}


def register_exporter(peft_type: PeftType, exporter: Exporter) -> None:
    """`exporter(model, adapter_name, folder)` writes the stock form of that adapter into the (empty) folder."""
    _EXPORTERS[peft_type] = exporter


def exportable(model: PeftModel, adapter_name: str | None = None) -> bool:
    """Whether `export_adapter` can write this adapter (its method registered an exporter)."""
    return model.peft_config[adapter_name or model.active_adapter].peft_type in _EXPORTERS


def export_adapter(
    model: PeftModel, path: str | Path, adapter_name: str | None = None, overwrite: bool = False
) -> Path:
    """Export `adapter_name` (default: the active adapter) of a peftlab model to `path` in a stock format."""
    if not isinstance(model, PeftModel):
        raise ValueError(f"export_adapter needs a peft.PeftModel, got {type(model).__name__}")
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter_name={adapter_name!r} is not an adapter of this model: {list(model.peft_config)}")
    peft_type = model.peft_config[adapter_name].peft_type
    if peft_type not in _EXPORTERS:
        allowed = ", ".join(sorted(t.value for t in _EXPORTERS))
        raise ValueError(f"export_adapter supports peft types {allowed}; got {peft_type.value}")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"export path {path} exists and is not empty; pass overwrite=True to replace it")
    with staged_folder(path) as staging:
        _EXPORTERS[peft_type](model, adapter_name, staging)
    return path

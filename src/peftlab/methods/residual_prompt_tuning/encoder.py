"""The residual prompt encoder: a stock `PromptEmbedding` whose table goes through a residual MLP.

PEFT's `get_prompt` calls the encoder on ONE row of prompt indices and repeats the result to the batch; the encoder
additionally reparameterizes the whole (n x d) table once per call and only then looks the indices up, so the MLP
always runs once on the unbatched prompt, whatever index shape it is given.

What is saved (`_get_adapter_state_dict`): `prompt_embeddings` is always the reparameterized prompt P', which is what
stock PEFT uses directly in inference mode, so a loaded adapter needs no MLP (and builds none) and the file is a valid
PROMPT_TUNING payload. A trainable encoder also saves its raw prompt and MLP under `TRAINING_STATE_PREFIX`, which
`_load_adapter_state_dict` restores into a trainable encoder, so Trainer's resume-from-checkpoint continues exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft import PromptEmbedding, PromptTuningInit
from torch import nn

from peftlab.methods.residual_prompt_tuning.config import ResidualPromptTuningConfig, resolved_layer_norm

# checkpoint keys of the trainable state (raw prompt and MLP); never a key of the model's own state dict
TRAINING_STATE_PREFIX = "residual_prompt_encoder."

_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


class ResidualMLP(nn.Module):
    """One MLP shared by all prompt tokens: x -> LN(Dropout(W_up act(W_down x))) (+ x); x is (n, d)."""

    def __init__(self, config: ResidualPromptTuningConfig) -> None:
        super().__init__()
        d, m = config.token_dim, config.encoder_bottleneck_size
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        self.dropout = nn.Dropout(config.encoder_dropout)
        self.layer_norm = nn.LayerNorm(d) if resolved_layer_norm(config) else nn.Identity()
        self.activation = _ACTIVATIONS[config.encoder_nonlinearity]
        self.residual = config.encoder_residual

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        out = self.layer_norm(self.dropout(self.up(self.activation(self.down(prompt)))))
        return out + prompt if self.residual else out


class TokenwiseResidualMLP(nn.Module):
    """One MLP per prompt token, batched along the TOKEN axis: row i of the (n, d) prompt goes through MLP i only.

    Parameters are stacked over tokens (first dimension n) and initialised per token as `nn.Linear` and
    `nn.LayerNorm` are, so token i's MLP is distributed exactly like the shared MLP.
    """

    def __init__(self, config: ResidualPromptTuningConfig) -> None:
        super().__init__()
        n, d, m = config.num_virtual_tokens, config.token_dim, config.encoder_bottleneck_size
        self.down_weight = nn.Parameter(torch.empty(n, d, m))
        self.down_bias = nn.Parameter(torch.empty(n, m))
        self.up_weight = nn.Parameter(torch.empty(n, m, d))
        self.up_bias = nn.Parameter(torch.empty(n, d))
        if resolved_layer_norm(config):
            self.norm_weight = nn.Parameter(torch.ones(n, d))
            self.norm_bias = nn.Parameter(torch.zeros(n, d))
        else:
            self.norm_weight = self.norm_bias = None
        self.dropout = nn.Dropout(config.encoder_dropout)
        self.activation = _ACTIVATIONS[config.encoder_nonlinearity]
        self.residual = config.encoder_residual
        self.eps = 1e-5  # nn.LayerNorm's default
        # nn.Linear's default init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias alike
        for weight, bias, fan_in in ((self.down_weight, self.down_bias, d), (self.up_weight, self.up_bias, m)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(torch.einsum("nd,ndm->nm", prompt, self.down_weight) + self.down_bias)
        out = self.dropout(torch.einsum("nm,nmd->nd", hidden, self.up_weight) + self.up_bias)
        if self.norm_weight is not None:
            out = F.layer_norm(out, out.shape[-1:], eps=self.eps) * self.norm_weight + self.norm_bias
        return out + prompt if self.residual else out


class ResidualPromptEncoder(PromptEmbedding):
    """Stock prompt embedding (same init code) plus the residual MLP; built by `_setup_prompt_encoder`."""

    def __init__(self, config: ResidualPromptTuningConfig, word_embeddings: nn.Module) -> None:
        weight = getattr(word_embeddings, "weight", None)
        # DeepSpeed ZeRO-3 partitions the weight and keeps its real shape in `ds_shape`
        shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
        if len(shape) != 2:
            raise ValueError(
                "Residual Prompt Tuning needs a base model whose get_input_embeddings() is a token embedding with a "
                f"2-D (vocab_size, hidden_size) weight; got {type(word_embeddings).__name__} with weight shape {shape}"
            )
        vocab_size, model_dim = shape
        if config.token_dim != model_dim:
            raise ValueError(
                f"Residual prompt of shape ({config.num_virtual_tokens}, {config.token_dim}) (token_dim="
                f"{config.token_dim}) does not fit the base model, whose input embeddings have shape "
                f"({vocab_size}, {model_dim}): the adapter was made for a base model of another hidden size"
            )
        super().__init__(config, word_embeddings)
        if config.prompt_tuning_init == PromptTuningInit.RANDOM and not config.inference_mode:
            nn.init.uniform_(self.embedding.weight, -0.5, 0.5)  # the official code's random init
        # A loaded (inference-mode) adapter holds P' in `embedding` already: no MLP, no wasted memory.
        if config.inference_mode:
            self.mlp = None
        else:
            self.mlp = TokenwiseResidualMLP(config) if config.encoder_separate else ResidualMLP(config)

    def reparameterized_prompt(self) -> torch.Tensor:
        """P' (n x d): the MLP applied once to the unbatched prompt table; the stored table when there is no MLP."""
        if self.mlp is None:
            return self.embedding.weight
        return self.mlp(self.embedding.weight)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.reparameterized_prompt())

    @torch.no_grad()
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: P' (deterministic, without dropout) and, when trainable, the training state."""
        if self.mlp is None:
            return {"prompt_embeddings": self.embedding.weight.detach()}
        was_training = self.training
        self.eval()
        try:
            prompt = self.reparameterized_prompt().detach().clone()
        finally:
            self.train(was_training)
        state = {"prompt_embeddings": prompt}
        state.update({TRAINING_STATE_PREFIX + key: value.detach() for key, value in self.state_dict().items()})
        return state

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return model.prompt_encoder[adapter_name].adapter_state_dict()

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # Our keys carry no adapter name; stock stripping could mangle one whose part equals the adapter's name.
        if key == "prompt_embeddings" or key.startswith(TRAINING_STATE_PREFIX):
            return key
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if "prompt_embeddings" not in state_dict:
            raise ValueError("the checkpoint has no 'prompt_embeddings': it is not a prompt-tuning adapter")
        own = self.state_dict()
        if self.mlp is None:
            self._check_shape("prompt_embeddings", state_dict["prompt_embeddings"], own["embedding.weight"])
            self.embedding.load_state_dict({"weight": state_dict["prompt_embeddings"]}, strict=True)
            return
        training_state = {
            key.removeprefix(TRAINING_STATE_PREFIX): value
            for key, value in state_dict.items()
            if key.startswith(TRAINING_STATE_PREFIX)
        }
        if training_state.keys() != own.keys():
            raise ValueError(
                "cannot load this checkpoint into a trainable residual prompt encoder: it holds the encoder state "
                f"{sorted(training_state) or 'none'} but the encoder needs {sorted(own)}. Checkpoints that carry only "
                "the reparameterized prompt (saved from an inference-mode model, or exported) load for inference "
                "only (PeftModel.from_pretrained, or load_adapter under a new adapter name); a config with other "
                "encoder_* settings than the checkpoint's cannot resume it either."
            )
        for key, value in training_state.items():
            self._check_shape(TRAINING_STATE_PREFIX + key, value, own[key])
        self.load_state_dict(training_state, strict=True)

    @staticmethod
    def _check_shape(key: str, saved: torch.Tensor, expected: torch.Tensor) -> None:
        if saved.shape != expected.shape:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(saved.shape)} but this model expects "
                f"{tuple(expected.shape)}: the adapter was made for another base model or prompt configuration"
            )

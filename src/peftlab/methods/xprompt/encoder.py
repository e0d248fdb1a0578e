"""The XPrompt prompt encoder: a prompt-tuning embedding with token and piece masks and a stage-1 snapshot.

Pruned tokens are REMOVED from the sequence (the encoder returns only the surviving rows, and
`config.num_virtual_tokens` equals their count); pruned pieces are multiplied by zero in `forward`, so the value
the model sees is exactly zero and no gradient reaches them, whatever the optimizer (weight decay, stale Adam
moments) does to the underlying parameter.
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.prompt_tuning import PromptEmbedding

from peftlab.methods.xprompt.config import XPromptConfig, check_pieces_divide

# keys of the saved adapter besides stock "prompt_embeddings" (the effective prompt of the surviving tokens)
TOKEN_MASK_KEY = "xprompt_token_mask"
PIECE_MASK_KEY = "xprompt_piece_mask"
STAGE1_KEY = "xprompt_stage1_prompt"
HAS_STAGE1_KEY = "xprompt_has_stage1"
EXTRA_KEYS = (TOKEN_MASK_KEY, PIECE_MASK_KEY, STAGE1_KEY, HAS_STAGE1_KEY)


class XPromptEmbedding(PromptEmbedding):
    """Holds the full stage-1-length prompt (n0 x d) when trainable, the masks, and the stage-1 snapshot.

    In inference mode (an adapter loaded with `PeftModel.from_pretrained`) peft reads `embedding.weight` directly,
    so there `embedding` holds only the effective prompt of the surviving tokens, exactly like stock PROMPT_TUNING;
    the masks and snapshot are still loaded so that the adapter can be inspected and re-saved without loss.
    """

    def __init__(self, config: XPromptConfig, word_embeddings: torch.nn.Module) -> None:
        if config.num_transformer_submodules != 1:
            raise ValueError(
                f"num_transformer_submodules must be 1 for XPrompt, got {config.num_transformer_submodules!r}"
            )
        check_pieces_divide(config.num_pieces, config.token_dim)
        n0, k, d = config.num_original_tokens, config.num_pieces, config.token_dim
        if config.inference_mode:
            super().__init__(config, word_embeddings)
        else:
            full = copy.copy(config)
            full.num_virtual_tokens = n0
            super().__init__(full, word_embeddings)
        self.config = config
        self.register_buffer("token_mask", torch.ones(n0, dtype=torch.bool))
        self.register_buffer("piece_mask", torch.ones(n0, k, dtype=torch.bool))
        self.register_buffer("stage1_prompt", torch.zeros(n0, d))
        self.register_buffer("has_stage1", torch.zeros(1, dtype=torch.bool))
        # derived from the masks (not saved): surviving row indices and their element-level 0/1 mask
        self.register_buffer("kept_index", torch.arange(n0), persistent=False)
        self.register_buffer("kept_element_mask", torch.ones(n0, d), persistent=False)
        self._num_kept = n0
        self._pruned = False

    @property
    def trainable(self) -> bool:
        return not self.config.inference_mode

    def element_mask(self) -> torch.Tensor:
        """(n0, d) 0/1 mask of every prompt entry: 0 for pruned tokens and for pruned pieces of surviving ones."""
        d = self.config.token_dim
        keep = self.piece_mask & self.token_mask[:, None]
        return keep.repeat_interleave(d // self.config.num_pieces, dim=1)

    def refresh(self) -> None:
        """Recompute the derived buffers after the masks changed."""
        self.kept_index = torch.nonzero(self.token_mask).flatten()
        self.kept_element_mask = self.element_mask()[self.kept_index].to(self.kept_element_mask.dtype)
        self._num_kept = int(self.kept_index.numel())
        self._pruned = not bool(self.token_mask.all() and self.piece_mask.all())

    def effective_prompt(self) -> torch.Tensor:
        """The prompt the model sees: surviving tokens only, pruned pieces exactly zero (differentiable)."""
        if not self.trainable:
            return self.embedding.weight
        if self._num_kept != self.config.num_virtual_tokens:
            raise ValueError(
                f"the prompt has {self._num_kept} surviving tokens but config.num_virtual_tokens is "
                f"{self.config.num_virtual_tokens}: load the adapter state (masks) before using this model"
            )
        weight = self.embedding.weight
        if not self._pruned:
            return weight
        return weight.index_select(0, self.kept_index) * self.kept_element_mask.to(weight.dtype)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if not self.trainable:
            return super().forward(indices)
        prompt = self.effective_prompt()
        return prompt.unsqueeze(0).expand(indices.shape[0], -1, -1)

    # --- saving and loading (peft's BasePromptEncoder hooks) -------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        encoder = model.prompt_encoder[adapter_name]
        return encoder.adapter_state()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What is saved: "prompt_embeddings" is the effective prompt (so inference works like stock prompt
        tuning); the masks and the stage-1 snapshot let training resume and rewind exactly after loading."""
        return {
            "prompt_embeddings": self.effective_prompt().detach().cpu().clone(),
            TOKEN_MASK_KEY: self.token_mask.cpu().clone(),
            PIECE_MASK_KEY: self.piece_mask.cpu().clone(),
            STAGE1_KEY: self.stage1_prompt.cpu().clone(),
            HAS_STAGE1_KEY: self.has_stage1.cpu().clone(),
        }

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore the masks and snapshot; in training mode scatter the surviving rows back into the full prompt.

        Entries of the full prompt under a mask are never observable (forward multiplies them by zero), so the
        effective prompt plus the masks determine training exactly. A stock PROMPT_TUNING state (no masks) of
        length n0 loads as an unpruned prompt.
        """
        n0, k, d = self.config.num_original_tokens, self.config.num_pieces, self.config.token_dim
        prompt = state_dict["prompt_embeddings"]
        if TOKEN_MASK_KEY in state_dict:
            token_mask = state_dict[TOKEN_MASK_KEY].bool()
            piece_mask = state_dict[PIECE_MASK_KEY].bool()
            stage1 = state_dict[STAGE1_KEY]
            has_stage1 = state_dict[HAS_STAGE1_KEY].bool()
        else:
            token_mask = torch.ones(prompt.shape[0], dtype=torch.bool)
            piece_mask = torch.ones(prompt.shape[0], k, dtype=torch.bool)
            stage1 = torch.zeros(prompt.shape[0], d)
            has_stage1 = torch.zeros(1, dtype=torch.bool)
        expected = {"token mask": (n0,), "piece mask": (n0, k), "stage-1 prompt": (n0, d)}
        found = {"token mask": token_mask.shape, "piece mask": piece_mask.shape, "stage-1 prompt": stage1.shape}
        for name, shape in expected.items():
            if tuple(found[name]) != shape:
                raise ValueError(
                    f"the saved XPrompt {name} has shape {tuple(found[name])} but this model expects {shape} "
                    f"(num_original_tokens={n0}, num_pieces={k}, token_dim={d})"
                )
        kept = int(token_mask.sum())
        if tuple(prompt.shape) != (kept, d):
            raise ValueError(
                f"the saved prompt_embeddings have shape {tuple(prompt.shape)} but the saved token mask keeps "
                f"{kept} tokens of size {d}: expected {(kept, d)}"
            )
        if not self.trainable and kept != self.config.num_virtual_tokens:
            raise ValueError(
                f"the saved prompt keeps {kept} tokens but the adapter config says num_virtual_tokens="
                f"{self.config.num_virtual_tokens}"
            )
        with torch.no_grad():
            self.token_mask.copy_(token_mask)
            self.piece_mask.copy_(piece_mask)
            self.stage1_prompt.copy_(stage1)
            self.has_stage1.copy_(has_stage1)
            weight = self.embedding.weight
            if self.trainable:
                weight.zero_()
                weight[torch.nonzero(token_mask.to(weight.device)).flatten()] = prompt.to(weight)
                self.config.num_virtual_tokens = kept
            else:
                weight.copy_(prompt.to(weight))
        self.refresh()

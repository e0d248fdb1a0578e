"""The UniPELT gates and the per-forward context they read (padding mask, running sums of cached decoding).

A gate is G = mean_t sigmoid(W x_t + b). Its mean needs two things a layer does not see: which positions are padding,
and, in a decoder with a KV cache, the tokens of earlier forward calls. A `GateContext` per transformer stack (BERT,
GPT-2 and LLaMA model bodies, T5's encoder and decoder) is filled by a forward pre-hook on that stack with its 2-D
attention mask and, for cached decoding, the running sums stored on the cache object by the previous call.

Definition:
- bidirectional stacks (encoders): one scalar per example, the mean over the (non-padding) tokens, as in the paper;
- causal stacks (GPT-2, LLaMA, T5 decoder): token t gets the mean over tokens 1..t. A mean over the whole sequence
  would let every position see a function of future tokens (a leak in teacher-forced training), and it could not be
  reproduced token by token. With the running mean, token t's computation depends on tokens <= t only, so cached
  generation (running sums carried on the cache) equals uncached generation.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

CACHE_STATE_ATTR = "_peftlab_unipelt_gate_sums"
INIT_STD = 0.02


def init_official(module: nn.Linear | nn.Embedding) -> nn.Linear | nn.Embedding:
    """N(0, 0.02) weights and zero biases: the official code's initialization of every UniPELT module but LoRA."""
    nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


class GateContext:
    """What the gates of one transformer stack need to know about the current forward call."""

    def __init__(self, stack_id: str, causal: bool) -> None:
        self.stack_id = stack_id
        self.causal = causal
        self.mask: torch.Tensor | None = None
        self.past: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache: object | None = None
        self.past_missing = False

    def begin(self, attention_mask: torch.Tensor | None, cache: object | None) -> None:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "UniPELT gates need a 2-D attention_mask (batch, sequence) to know which tokens are padding; got a "
                f"{attention_mask.dim()}-D mask"
            )
        self.mask = attention_mask
        self.cache = cache
        self.new = {}
        self.past = {}
        self.past_missing = False
        if not self.causal or cache is None:
            return
        past_len = int(cache.get_seq_length())
        if past_len == 0:
            return
        state = getattr(cache, CACHE_STATE_ATTR, {}).get(self.stack_id)
        if state is None or state[0] != past_len:
            # an error only if a gate runs on it (not while the adapter is disabled: no gate needs the sums then)
            self.past_missing = True
            return
        self.past = state[1]

    def check_past(self) -> None:
        if self.past_missing:
            raise RuntimeError(
                "UniPELT: this cache holds no gate running sums for its length (it was built without this adapter, "
                "e.g. under disable_adapter(), or cropped, as in assisted decoding); decoder gates cannot be "
                "continued. Use greedy, sampled or beam-search generation with one adapter state throughout, or run "
                "without a cache."
            )

    def end(self, cache: object | None) -> None:
        """Store this call's running sums on the cache, for the next (incremental) call."""
        cache = cache if cache is not None else self.cache
        if not self.causal or cache is None or not self.new:
            return
        store = getattr(cache, CACHE_STATE_ATTR, None)
        if store is None:
            store = {}
            setattr(cache, CACHE_STATE_ATTR, store)
            _follow_batch_edits(cache, store)
        store[self.stack_id] = (int(cache.get_seq_length()), dict(self.new))

    def token_weights(self, length: int, like: torch.Tensor) -> torch.Tensor | None:
        """(batch, length) 1/0 weights of the current tokens, or None when every token counts."""
        if self.mask is None:
            return None
        return self.mask[:, -length:].to(like.dtype)


def _follow_batch_edits(cache: object, store: dict) -> None:
    """Keep the running sums aligned with the cache rows when `generate` reorders or selects them (beam search).

    The cache's own batch methods are wrapped on this cache instance only; a crop (e.g. assisted decoding) cannot be
    undone on a sum, so it drops the sums and the next incremental call raises the error in `GateContext.begin`.
    """

    def remap(edit) -> None:
        for stack_id, (length, sums) in list(store.items()):
            store[stack_id] = (length, {key: (edit(s), edit(c)) for key, (s, c) in sums.items()})

    def wrap(name: str, edit_for) -> None:
        method = getattr(cache, name, None)
        if method is None:
            return

        def wrapped(arg, *args, **kwargs):
            remap(edit_for(arg))
            return method(arg, *args, **kwargs)

        setattr(cache, name, wrapped)

    wrap("reorder_cache", lambda index: lambda t: t.index_select(0, index.to(t.device)))
    wrap("batch_select_indices", lambda index: lambda t: t[index.to(t.device)])
    wrap("batch_repeat_interleave", lambda repeats: lambda t: t.repeat_interleave(repeats, dim=0))
    crop = getattr(cache, "crop", None)
    if crop is not None:

        def cropped(*args, **kwargs):
            store.clear()
            return crop(*args, **kwargs)

        cache.crop = cropped


_DETACHED_CONTEXT = GateContext("detached", causal=False)


class Gate(nn.Linear):
    """Linear(d, 1) + sigmoid per token, averaged as described in the module docstring.

    A Linear itself (not a module holding one), so that its state-dict keys end in `<adapter>.weight` as PEFT's
    adapter-name handling expects.
    """

    def __init__(self, hidden_size: int, ignore_padding: bool) -> None:
        super().__init__(hidden_size, 1)
        init_official(self)
        self.ignore_padding = ignore_padding
        self.context: GateContext = _DETACHED_CONTEXT
        self.key = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the gate for input x (batch, seq, d): (batch, 1, 1) for encoders, (batch, seq, 1) for decoders."""
        scores = torch.sigmoid(super().forward(x).squeeze(-1))  # (batch, seq)
        ctx = self.context
        weights = ctx.token_weights(scores.shape[1], scores) if self.ignore_padding else None
        if not ctx.causal:
            if weights is None:
                return scores.mean(dim=1)[:, None, None]
            return ((scores * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0))[:, None, None]
        ctx.check_past()
        if weights is None:
            weights = torch.ones_like(scores)
        sums = torch.cumsum(scores * weights, dim=1)
        counts = torch.cumsum(weights, dim=1)
        past = ctx.past.get(self.key)
        if past is not None:
            sums = sums + past[0][:, None]
            counts = counts + past[1][:, None]
        ctx.new[self.key] = (sums[:, -1].detach(), counts[:, -1].detach())
        return (sums / counts.clamp_min(1.0))[:, :, None]


CONTEXT_ATTR = "_peftlab_unipelt_gate_context"


@functools.cache
def _forward_signature(forward: Callable) -> inspect.Signature:
    return inspect.signature(forward)


def _stack_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    bound = _forward_signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
    extra = bound.get("kwargs", {})
    cache = bound.get("cache", extra.get("past_key_values"))
    getattr(module, CONTEXT_ATTR).begin(bound.get("attention_mask"), cache)


def _stack_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    getattr(module, CONTEXT_ATTR).end(cache)


def install_stack_hooks(stack: nn.Module, context: GateContext) -> list:
    """Hooks that fill `context` for each forward of `stack` (a module whose forward takes the 2-D attention_mask).

    The context lives on the stack and the hooks are plain functions that look it up there, not closures over it:
    `copy.deepcopy(model)` (an EMA or a reference model) keeps the hook functions as they are, so a closure would
    feed the ORIGINAL model's context from the copy's forward, and the copy's cached decoding would fail."""
    setattr(stack, CONTEXT_ATTR, context)
    return [
        stack.register_forward_pre_hook(_stack_pre_hook, with_kwargs=True),
        stack.register_forward_hook(_stack_post_hook, with_kwargs=True),
    ]

"""The one place where a speculative method becomes a proposer."""

from __future__ import annotations

import torch

from ..core.config import LlamaConfig
from ..core.model import Llama
from ..core.weights import load_llama, read_embedding
from . import checkpoints
from .draft_model import DraftModelProposer
from .heads import HeadsProposer
from .ngram import NgramProposer
from .proposer import Proposer


def is_checkpoint(source: str) -> bool:
    """A trained drafter checkpoint (a committed name or a .safetensors file)."""
    return source in checkpoints.HASHES or source.endswith(".safetensors")


def load_draft_model(source: str, target: LlamaConfig, dtype: torch.dtype, target_source=None) -> Llama:
    """The draft model, checked against the target's config (same vocabulary)."""
    if source == "random-tiny":
        config = LlamaConfig.from_name("tiny").with_(vocab_size=target.vocab_size, max_seq_len=target.max_seq_len)
        return Llama(config).init_random(seed=0).to(dtype).eval().requires_grad_(False).pack()
    if is_checkpoint(source):
        return checkpoints.load_draft_model(source, read_embedding(target_source), dtype)
    draft = load_llama(source, dtype).pack()
    if draft.config.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {source!r} has {draft.config.vocab_size} tokens; the target has "
                         f"{target.vocab_size}: they must share the tokenizer")
    return draft


def build_proposers(methods: list[str], target: LlamaConfig, dtype: torch.dtype, draft_model: str | None,
                    draft_heads: str | None = None, target_source=None) -> dict[str, Proposer]:
    """target_source: the target's weights (trained drafters share its embedding)."""
    proposers: dict[str, Proposer] = {}
    for method in methods:
        if method == "ngram":
            proposers[method] = NgramProposer()
        elif method == "draft_model":
            if not draft_model:
                raise ValueError("method draft_model needs draft_model weights")
            draft = load_draft_model(draft_model, target, dtype, target_source)
            proposers[method] = DraftModelProposer(draft, target.vocab_size)
        elif method == "heads":
            if not draft_heads:
                raise ValueError("method heads needs draft_heads weights")
            heads = checkpoints.load_heads(draft_heads, read_embedding(target_source), dtype)
            proposers[method] = HeadsProposer(heads, target.vocab_size)
        elif method != "none":
            raise ValueError(f"unknown speculative method {method!r}")
    return proposers

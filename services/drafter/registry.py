"""The one place where a speculative method becomes a proposer."""

from __future__ import annotations

import torch

from ..core.config import LlamaConfig
from ..core.model import Llama
from ..core.weights import load_llama
from .draft_model import DraftModelProposer
from .ngram import NgramProposer
from .proposer import Proposer


def load_draft_model(source: str, target: LlamaConfig, dtype: torch.dtype) -> Llama:
    """The draft model, checked against the target's config (same vocabulary)."""
    if source == "random-tiny":
        config = LlamaConfig.from_name("tiny").with_(vocab_size=target.vocab_size, max_seq_len=target.max_seq_len)
        return Llama(config).init_random(seed=0).to(dtype).eval().requires_grad_(False).pack()
    draft = load_llama(source, dtype).pack()
    if draft.config.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {source!r} has {draft.config.vocab_size} tokens; the target has "
                         f"{target.vocab_size}: they must share the tokenizer")
    return draft


def build_proposers(methods: list[str], target: LlamaConfig, dtype: torch.dtype,
                    draft_model: str | None) -> dict[str, Proposer]:
    proposers: dict[str, Proposer] = {}
    for method in methods:
        if method == "ngram":
            proposers[method] = NgramProposer()
        elif method == "draft_model":
            if not draft_model:
                raise ValueError("method draft_model needs draft_model weights")
            proposers[method] = DraftModelProposer(load_draft_model(draft_model, target, dtype))
        elif method != "none":
            raise ValueError(f"unknown speculative method {method!r}")
    return proposers

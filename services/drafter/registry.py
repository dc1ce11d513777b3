"""The speculative methods: what each needs, and where it becomes a proposer.

``METHODS`` is the one table (vLLM's ``SpeculativeConfig.method`` chooses a
proposer the same way): the settings validate a model's methods against it,
the verifier reads what a method asks of the target (its hidden rows) and of
the draft (chains or trees), the wirings read whether a drafter runs at all,
and ``build_proposers`` builds each method's proposer from its entry. Adding a
method is one entry here and one proposer module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import devices
from ..core.config import LlamaConfig
from ..core.model import Llama
from ..core.weights import load_llama, read_embedding
from . import checkpoints
from .draft_model import DraftModelProposer
from .heads import HeadsProposer
from .ngram import NgramProposer
from .proposer import Proposer


@dataclass(frozen=True)
class DraftInputs:
    """What a method's builder is handed to make its proposer."""

    target: LlamaConfig  # the target's config (the draft shares its vocabulary)
    dtype: torch.dtype  # compute dtype of the draft's weights
    weights: str | None = None  # the method's weights (the ModelSettings field MethodSpec.weights names)
    device: torch.device = torch.device("cpu")  # where the draft computes (the target's device)
    # the target's embedding matrix [vocab, dim], one tensor for every method (trained drafters share it)
    embedding: Callable[[], torch.Tensor] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """What one speculative method needs."""

    name: str  # what SpeculativeParams.method and ModelSettings.speculative_methods call it
    build: Callable[[DraftInputs], Proposer] | None = None  # its proposer; None: no drafts (plain decoding)
    weights: str | None = None  # the ModelSettings field naming its weights (required when offered); None: none
    hidden: bool = False  # drafts from the target's hidden state: Score returns the hidden rows (return_hidden)
    request_cache: bool = False  # keeps state per request in the drafter (a draft KV cache, n-gram tables)
    trees: bool = False  # can propose a tree (num_candidates > 1); False: a chain, whatever the request asks
    sampled: bool = False  # sampled drafts carry their distribution q (else deterministic, one-hot)
    # the adaptive draft length's memory of the acceptance rate, in verified tokens (a trained drafter's
    # rate is steady); None: a moving average over rounds, which follows copy spans (verifier.draft_length)
    acceptance_memory: int | None = None
    # the proposer's own time per draft position + 1, in plain rounds (verifier.draft_length's overhead u;
    # a 2-core EPYC, SmolLM2: Hydra heads 0.03 in float32 to 0.064 in bfloat16)
    draft_cost: float = 0.0
    classes: bool = False  # its chains carry a confidence class: the verifier learns a draft length per class

    @property
    def drafts(self) -> bool:
        """Whether the method asks the drafter for drafts at all."""
        return self.build is not None


def is_checkpoint(source: str) -> bool:
    """A trained drafter checkpoint (a committed name or a .safetensors file)."""
    return source in checkpoints.HASHES or source.endswith(".safetensors")


def load_draft_model(source: str, target: LlamaConfig, dtype: torch.dtype,
                     embedding: Callable[[], torch.Tensor], device: torch.device | str = "cpu") -> Llama:
    """The draft model on ``device``, checked against the target's config (same vocabulary); a trained
    checkpoint around the target's embedding (``embedding()``, shared)."""
    if source == "random-tiny":
        config = LlamaConfig.from_name("tiny").with_(vocab_size=target.vocab_size, max_seq_len=target.max_seq_len)
        return devices.prepare(Llama(config).init_random(seed=0).to(dtype).eval().requires_grad_(False), device)
    if is_checkpoint(source):
        return devices.prepare(checkpoints.load_draft_model(source, embedding(), dtype), device)
    draft = devices.prepare(load_llama(source, dtype), device)
    if draft.config.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {source!r} has {draft.config.vocab_size} tokens; the target has "
                         f"{target.vocab_size}: they must share the tokenizer")
    return draft


def _draft_model(i: DraftInputs) -> Proposer:
    return DraftModelProposer(load_draft_model(i.weights, i.target, i.dtype, i.embedding, i.device),
                              i.target.vocab_size)


def _heads(i: DraftInputs) -> Proposer:
    heads = checkpoints.load_heads(i.weights, i.embedding(), i.dtype).to(i.device)
    heads.set_embedding(heads.embed.to(i.device))  # the target's embedding is an attribute, not a parameter
    return HeadsProposer(heads.pack(), i.target.vocab_size)


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("none"),
    MethodSpec("ngram", build=lambda i: NgramProposer(), request_cache=True, trees=True, classes=True),
    MethodSpec("draft_model", build=_draft_model, weights="draft_model", request_cache=True, trees=True,
               sampled=True, acceptance_memory=16, draft_cost=0.05),
    MethodSpec("heads", build=_heads, weights="draft_heads", hidden=True, trees=True, sampled=True,
               acceptance_memory=16, draft_cost=0.05),
)}


def method_spec(name: str) -> MethodSpec:
    """The entry of ``name`` ("" is "none"); ValueError names the known ones."""
    spec = METHODS.get(name or "none")
    if spec is None:
        raise ValueError(f"unknown speculative method {name!r}; known: {list(METHODS)}")
    return spec


def build_proposers(methods: list[str], target: LlamaConfig, dtype: torch.dtype,
                    weights: dict[str, str | None] | None = None, target_source=None,
                    device: torch.device | str = "cpu", embed: torch.Tensor | None = None) -> dict[str, Proposer]:
    """The proposer of each drafting method. weights: ModelSettings field ->
    value (``MethodSpec.weights``); target_source: the target's weights
    (trained drafters share its embedding); device: where drafts compute;
    embed: the target's embedding matrix where the target is in this process
    (the drafters then hold no copy of it). Without it the matrix is read
    once from ``target_source`` and shared by every method."""
    shared: list[torch.Tensor] = [] if embed is None else [embed]

    def embedding() -> torch.Tensor:
        if not shared:
            shared.append(read_embedding(target_source))
        return shared[0]

    proposers: dict[str, Proposer] = {}
    for name in methods:
        spec = method_spec(name)
        if not spec.drafts:
            continue
        source = (weights or {}).get(spec.weights) if spec.weights else None
        if spec.weights and not source:
            raise ValueError(f"method {name} needs {spec.weights} weights")
        proposers[name] = spec.build(DraftInputs(target, dtype, source, torch.device(device), embedding))
    return proposers

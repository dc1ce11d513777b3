"""One table of speculative methods (``arserve.drafter.registry.METHODS``):
a method added as one ``MethodSpec`` entry and one proposer is validated by
the settings, built by the drafter's registry and served by the decode loop,
and its greedy output is plain greedy's."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import run, tiny_target

from arserve.backbone.service import BackboneService
from arserve.drafter import registry
from arserve.drafter.proposer import Draft, DraftRequest, Proposer
from arserve.drafter.registry import MethodSpec, build_proposers
from arserve.drafter.service import DrafterService
from arserve.settings import ModelSettings
from arserve.verifier.service import VerifierService


class RepeatProposer(Proposer):
    """A toy method: draft the last committed token k times."""

    def propose(self, req: DraftRequest) -> Draft:
        return Draft([req.tokens[-1]] * req.k)


def test_a_method_added_by_one_entry_is_served_and_greedy_stays_greedy(monkeypatch):
    with pytest.raises(ValueError, match="unknown speculative methods \\['repeat'\\]"):
        ModelSettings(id="tiny", source="tiny.gguf", speculative_methods=["repeat"])
    monkeypatch.setitem(registry.METHODS, "repeat", MethodSpec("repeat", build=lambda inputs: RepeatProposer()))

    settings = ModelSettings(id="tiny", source="tiny.gguf", speculative_methods=["repeat"],
                             default_speculative_method="repeat")
    assert settings.speculative_methods == ["none", "repeat"]
    target = tiny_target()
    proposers = build_proposers(settings.speculative_methods, target.config, torch.float32, settings.model_dump())
    assert list(proposers) == ["repeat"] and isinstance(proposers["repeat"], RepeatProposer)

    plain, _ = asyncio.run(run(VerifierService(BackboneService({"tiny": target}), None, {"tiny": (300,)}), "none"))
    verifier = VerifierService(BackboneService({"tiny": target}), DrafterService(proposers), {"tiny": (300,)})
    tokens, last = asyncio.run(run(verifier, "repeat"))
    assert tokens == plain and len(tokens) == 24
    assert last.speculative.method == "repeat" and last.speculative.drafted_tokens > 0

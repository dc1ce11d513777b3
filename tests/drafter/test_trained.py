"""SmolLM2's committed trained drafters: they load only when their recorded
hash matches, and (tests/verifier/test_speculative_greedy.py) decoding with
them is token-identical to plain greedy while they accept most drafts."""

import shutil

import pytest
import torch

from arserve import checkpoint_files
from arserve.drafter.checkpoints import CheckpointError, load_draft_model, load_heads
from arserve.settings import ModelSettings


@pytest.fixture(scope="module")
def embed():
    from arserve.core.weights import read_embedding, smollm2_gguf_path

    return read_embedding(smollm2_gguf_path())


@pytest.mark.parametrize("name,load", [("smollm2-draft", load_draft_model), ("smollm2-heads", load_heads)])
def test_a_checkpoint_whose_hash_differs_is_refused(tmp_path, monkeypatch, embed, name, load):
    assert load(name, embed) is not None  # the committed file matches its recorded hash
    bad = tmp_path / f"{name}.safetensors"
    shutil.copy(checkpoint_files.CHECKPOINT_DIR / f"{name}.safetensors", bad)
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(checkpoint_files, "CHECKPOINT_DIR", tmp_path)  # where committed names resolve
    with pytest.raises(CheckpointError, match="refusing to load a checkpoint that is not the recorded one"):
        load(name, embed)


def test_a_checkpoint_of_the_other_kind_or_an_unknown_name_is_refused(embed):
    with pytest.raises(CheckpointError, match="holds a 'heads' drafter, not 'draft_model'"):
        load_draft_model(str(checkpoint_files.CHECKPOINT_DIR / "smollm2-heads.safetensors"), embed)
    with pytest.raises(CheckpointError, match="no committed drafter checkpoint 'nope'"):
        load_heads("nope", embed)


def test_the_drafters_share_the_targets_embedding_and_fit_the_size_limit(embed):
    heads = load_heads("smollm2-heads", embed)
    assert torch.equal(heads.embed, embed) and heads.out_matrix.shape == (len(heads.head_ids), embed.shape[1])
    for name in ("smollm2-draft", "smollm2-heads"):
        assert (checkpoint_files.CHECKPOINT_DIR / f"{name}.safetensors").stat().st_size <= 40 * 2**20


def test_the_heads_load_and_draft_in_bfloat16(embed):
    """Every weight of the heads in the asked dtype: load_state_dict copies
    into the parameters as built (float32), so a bf16 target's heads once held
    float32 weights beside a bf16 embedding and failed at their first draft."""
    from arserve.drafter.heads import HeadsProposer
    from arserve.drafter.proposer import DraftRequest

    heads = load_heads("smollm2-heads", embed, torch.bfloat16)
    assert {p.dtype for p in heads.parameters()} == {torch.bfloat16} and heads.out_matrix.dtype == torch.bfloat16
    draft = HeadsProposer(heads, embed.shape[0]).propose(
        DraftRequest("r", tokens=[1, 2, 3], new=3, k=heads.num_heads, hidden=torch.randn(embed.shape[1])))
    assert len(draft.tokens) == heads.num_heads


def test_the_default_model_serves_the_trained_drafters():
    m = ModelSettings()
    assert {"draft_model", "heads"} <= set(m.speculative_methods)
    assert m.draft_model == "smollm2-draft" and m.draft_heads == "smollm2-heads"
    assert m.default_speculative_method == "ngram"  # the best measured (bench-results/drafters.json)


def test_in_one_process_the_trained_drafters_hold_the_targets_embedding_not_copies(server):
    """The embedded server's draft model and heads read the target's own
    embedding matrix (49,152 x 576 float32, 113 MB): no copy each (decision 66)."""
    verifier = server.service.verifier
    target = next(iter(verifier.backbone.models.values()))
    proposers = verifier.drafter.proposers
    draft, heads = proposers["draft_model"].model, proposers["heads"].heads
    assert draft.embed.data_ptr() == target.embed.data_ptr() == heads.embed.data_ptr()
    assert draft.embed.shape == target.embed.shape and not draft.embed.requires_grad

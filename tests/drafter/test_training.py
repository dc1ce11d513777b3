"""The drafter recipes run end to end on a small slice of the
self-distillation data: the data script stores what the target computed,
and each training command writes a checkpoint that loads and drafts."""

import pytest
import torch

from arserve.core.sampling import Sampling
from arserve.drafter.checkpoints import load_draft_model, load_heads
from arserve.drafter.draft_model import DraftModelProposer
from arserve.drafter.heads import HeadsProposer
from arserve.drafter.proposer import DraftRequest
from arserve.train.selfdistill import instructions, load_data, make_data
from arserve.train.smollm2 import DrafterTrainConfig, train_draft_model, train_heads


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("sd") / "data.safetensors", max_new=12, limit=6)


def test_the_instruction_set_is_the_projects_own():
    from conftest import bench_prompts

    rows = instructions()
    assert len(rows) >= 300 and {r["category"] for r in rows} == {"chat", "math", "copy"}
    bench = {p["messages"][-1]["content"] for p in bench_prompts()}
    assert not bench & {r["messages"][-1]["content"] for r in rows}


def test_the_data_holds_greedy_answers_and_the_targets_choices(data):
    d = load_data(data)
    offsets, at = d["offsets"].tolist(), d["answer_at"].tolist()
    assert len(at) == 12 and d["hidden"].shape == (offsets[-1], 576) and d["topk_ids"].shape == (offsets[-1], 32)
    assert d["instruction"].tolist() == list(range(6)) * 2  # a greedy and a sampled answer each
    assert any(not torch.equal(d["topk_ids"][offsets[s] + at[s] - 1:offsets[s + 1] - 1, 0],
                               d["tokens"][offsets[s] + at[s]:offsets[s + 1]]) for s in range(6, 12))
    for s in range(6):  # greedy answers: each answer token is the target's argmax at the position before
        a, b = offsets[s] + at[s], offsets[s + 1]
        assert torch.equal(d["topk_ids"][a - 1:b - 1, 0], d["tokens"][a:b])


def test_each_recipe_writes_a_checkpoint_that_drafts(data, tmp_path):
    from arserve.core.weights import read_embedding, smollm2_gguf_path

    embed = read_embedding(smollm2_gguf_path())
    tiny = dict(steps=2, warmup=1, batch=2)
    train_draft_model(tmp_path / "d.safetensors", DrafterTrainConfig(**tiny), data)
    train_heads(tmp_path / "h.safetensors", DrafterTrainConfig(**tiny, num_heads=2), data)
    draft = DraftModelProposer(load_draft_model(str(tmp_path / "d.safetensors"), embed), 49152)
    heads = HeadsProposer(load_heads(str(tmp_path / "h.safetensors"), embed), 49152)
    req = dict(request_id="r", tokens=[1, 2, 3], new=3, k=3, sampling=Sampling(temperature=0.0))
    assert len(draft.propose(DraftRequest(**req)).tokens) == 3
    assert len(heads.propose(DraftRequest(**req, hidden=torch.randn(576))).tokens) == 2  # its 2 heads

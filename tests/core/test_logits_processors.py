"""The logits processors (``arserve.core.logits_processors``: OpenAI's
penalties and logit bias, vLLM's min_tokens) and the draft paths the
verifier processes each scored row for (pure logic)."""

import torch

from arserve.core.logits_processors import LogitsProcessors
from arserve.pb.v1 import drafter_pb2 as dpb
from arserve.verifier.plan import paths


def test_each_row_is_penalized_for_the_output_and_its_own_path():
    logits = torch.zeros(3, 5)  # [rows, vocab]
    out = LogitsProcessors(presence=0.5, frequency=1.0).apply(logits, output=[1, 1, 2], after=[[], [3], [3, 1]])
    assert out[0].tolist() == [0.0, -2.5, -1.5, 0.0, 0.0]  # token 1 twice: 2 x 1.0 + 0.5
    assert out[1].tolist() == [0.0, -2.5, -1.5, -1.5, 0.0]  # and the draft's 3 before row 1
    assert out[2].tolist() == [0.0, -3.5, -1.5, -1.5, 0.0]
    assert logits.abs().sum() == 0  # a new tensor: the caller's logits are left as they were
    assert not LogitsProcessors().active and LogitsProcessors(frequency=-0.5).active


def test_a_rows_path_is_the_draft_before_it_in_chains_and_trees():
    assert paths(dpb.Draft(token_ids=[7, 8, 9])) == [[], [7], [7, 8], [7, 8, 9]]
    tree = dpb.Draft(token_ids=[7, 8, 9, 6], parents=[-1, -1, 1, 0])  # 7 and 8 under the root, 9 under 8
    assert paths(tree) == [[], [7], [8], [8, 9], [7, 6]]


def test_bias_moves_every_row_and_min_tokens_holds_the_end_back_until_its_row():
    logits = torch.zeros(3, 4)  # [rows, vocab]; end-of-sequence id 3
    rules = LogitsProcessors(bias=((0, 5.0), (2, -100.0)), min_tokens=3, eos=frozenset({3}))
    out = rules.apply(logits, output=[1], after=[[], [0], [0, 1]])
    assert out[:, 0].tolist() == [5.0] * 3 and out[:, 2].tolist() == [-100.0] * 3
    assert out[:, 3].tolist() == [float("-inf"), float("-inf"), 0.0]  # row 2 decides the 4th token: allowed
    assert not LogitsProcessors(min_tokens=3).active  # no end-of-sequence ids (ignore_eos): nothing to hold back

"""OpenAI's presence and frequency penalties (``arserve.core.penalties``) and
the draft paths the verifier penalizes each scored row for (pure logic)."""

import torch

from arserve.core.penalties import Penalties
from arserve.pb.v1 import drafter_pb2 as dpb
from arserve.verifier.service import paths


def test_each_row_is_penalized_for_the_output_and_its_own_path():
    logits = torch.zeros(3, 5)  # [rows, vocab]
    out = Penalties(presence=0.5, frequency=1.0).apply(logits, output=[1, 1, 2], after=[[], [3], [3, 1]])
    assert out[0].tolist() == [0.0, -2.5, -1.5, 0.0, 0.0]  # token 1 twice: 2 x 1.0 + 0.5
    assert out[1].tolist() == [0.0, -2.5, -1.5, -1.5, 0.0]  # and the draft's 3 before row 1
    assert out[2].tolist() == [0.0, -3.5, -1.5, -1.5, 0.0]
    assert logits.abs().sum() == 0  # a new tensor: the caller's logits are left as they were
    assert not Penalties().active and Penalties(frequency=-0.5).active


def test_a_rows_path_is_the_draft_before_it_in_chains_and_trees():
    assert paths(dpb.Draft(token_ids=[7, 8, 9])) == [[], [7], [7, 8], [7, 8, 9]]
    tree = dpb.Draft(token_ids=[7, 8, 9, 6], parents=[-1, -1, 1, 0])  # 7 and 8 under the root, 9 under 8
    assert paths(tree) == [[], [7], [8], [8, 9], [7, 6]]

"""Which scored row decided each token of a round (``deciding_rows``), and
the log-probabilities read from them (``token_logprobs``): pure logic."""

import torch

from arserve.verifier.logprobs import deciding_rows, token_logprobs


def test_a_chains_tokens_are_decided_by_the_row_before_each():
    # row 0 scores the pending token and decides draft node 0; row i + 1 scores node i and decides node i + 1
    assert deciding_rows([], []) == [0]  # all rejected: the correction comes from row 0
    assert deciding_rows([0, 1, 2], []) == [0, 1, 2, 3]  # three accepted, the bonus token from row 3


def test_a_trees_tokens_are_decided_by_their_parents_rows():
    # nodes: 0 and 1 under the root, 2 under 1, 3 under 2, 4 under 0
    parents = [-1, -1, 1, 2, 0]
    assert deciding_rows([1, 2, 3], parents) == [0, 2, 3, 4]  # path 1 -> 2 -> 3, then the token after node 3
    assert deciding_rows([0, 4], parents) == [0, 1, 5]


def test_logprobs_are_read_from_the_deciding_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # [3 rows, vocab 3]
    out = token_logprobs(logits, [1, 0], [0, 2], top=2)
    expected = logits.log_softmax(-1)
    assert [lp.token_id for lp in out] == [0, 2]
    assert abs(out[0].logprob - expected[1, 0].item()) < 1e-6 and abs(out[1].logprob - expected[0, 2].item()) < 1e-6
    assert [t.token_id for t in out[1].top] == [2, 1] and [t.token_id for t in out[0].top][0] == 0
    assert token_logprobs(logits, [0], [], top=1) == []  # a round that decided nothing to stream
    assert not token_logprobs(logits, [2, 2], [1, 1], top=0)[0].top  # 0: the chosen token's alone

"""What a request's ``SpeculativeStats`` count, one round at a time (the
verifier's loop and vLLM's engine report the same fields the same way).

A round is one target forward after the prompt; of a draft scored in it,
``drafted`` tokens were proposed, ``depth`` lie on its longest path (a chain:
all of them) and ``accepted`` were kept. The mean accepted length counts the
token every round yields besides its accepted ones (the bonus or the plain
round's token), as vLLM's and EAGLE's papers count it.
"""

from __future__ import annotations

from arserve_client.v1 import generation_pb2 as gpb


def count_positions(stats: gpb.SpeculativeStats, depth: int, accepted: int) -> None:
    """Per draft position: one more round drafted there (i < depth), and
    accepted there (i < accepted)."""
    for field, upto in ((stats.drafted_at, depth), (stats.accepted_at, accepted)):
        field.extend([0] * max(0, upto - len(field)))
        for i in range(upto):
            field[i] += 1


def count_draft(stats: gpb.SpeculativeStats, drafted: int, depth: int, accepted: int) -> None:
    """A scored draft: its tokens, the accepted ones, and both per position."""
    stats.drafted_tokens += drafted
    stats.accepted_tokens += accepted
    count_positions(stats, depth, accepted)


def update_mean(stats: gpb.SpeculativeStats) -> None:
    """mean_accepted_length = tokens committed per round (accepted + one per round)."""
    if stats.rounds:
        stats.mean_accepted_length = (stats.accepted_tokens + stats.rounds) / stats.rounds

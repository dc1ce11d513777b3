"""The words arserve uses, defined once.

Every module speaks this vocabulary; where a docstring says one of these words
it means exactly what is written here (after vLLM's ``RejectionSampler``
docstring, which defines its terms once and then keeps to them).

target
    The model whose output distribution arserve promises to keep: the backbone.
    Its next-token distribution at a position is ``p``.
draft
    Tokens proposed for the positions after the committed prefix by a cheaper
    proposer (n-gram lookup, a small model, heads). The proposer's
    distribution at a position is ``q`` (one-hot for deterministic proposers).
score
    One target forward over several new positions at once (a chain or a tree
    of draft tokens), yielding ``p`` at each of them.
accepted
    Draft tokens that the acceptance rule keeps: the target could have produced
    them itself.
recovered
    The token the acceptance rule samples at the first rejected position, from
    the residual distribution ``norm(max(0, p - q))``; it replaces the draft
    token there.
bonus
    The extra token sampled from ``p`` after the last draft position when every
    draft token was accepted.
commit
    Making positions permanent: their tokens join the request's output and
    their keys/values stay in the KV cache.
rollback
    Dropping scored-but-not-accepted positions from a KV cache.
block
    A run of ``block_size`` consecutive token positions of the KV cache; the
    unit of prefix sharing and of the Redis tier.
tier
    Where a KV block may live: process memory, then Redis, then recompute.
"""

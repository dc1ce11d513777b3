"""Stop strings over a text stream: text is released only once it cannot be
the start of a stop string, so a stream never shows part of one.

The stream stops at the stop string that completes first in the text (the
one with the smallest end; of those, the longest), so the text returned does
not depend on how the stream was cut into pieces: one token per piece, or a
whole speculative round (as vLLM's ``check_stop_strings`` picks the
earliest-completing stop since vllm-project/vllm#49391).

Token ids follow vLLM's rule, where the detokenizer checks stop strings after
each token: they run through the token whose text completes the stop string,
so they include the tokens that spell the stop (which the text excludes),
including one that straddles the stop's start, and nothing after it.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text held back: could begin a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add new text; return what may be released now."""
        if not self.stops:
            return text
        buf = self.pending + text
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]  # (end, start)
        if hits:
            self.stopped = True
            self.pending = ""
            return buf[: min(hits)[1]]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation nothing is held back."""
        out, self.pending = self.pending, ""
        return out

    def snapshot(self) -> "StopMatcher":
        """A copy to replay from (``tokens_through_stop``)."""
        return copy.copy(self)


async def tokens_through_stop(before: StopMatcher, token_ids: list[int],
                              decode: Callable[[int, bool], Awaitable[str]]) -> int:
    """How many of ``token_ids`` to return when the text of all of them hit a
    stop string: replayed one token at a time through ``before`` (the matcher
    as it was before these tokens), the count through the token whose text
    completes the stop. decode(token_id, last) -> the text that token
    releases (the caller carries the detokenizer's state from call to call)."""
    matcher = before.snapshot()
    for i, token in enumerate(token_ids):
        matcher.feed(await decode(token, i == len(token_ids) - 1))
        if matcher.stopped:
            return i + 1
    return len(token_ids)  # not reached: the pieces' text is the whole's text

"""Stop strings over a text stream: text is released only once it cannot be
the start of a stop string, so a stream never shows part of one."""

from __future__ import annotations


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
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return buf[: min(hits)]
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

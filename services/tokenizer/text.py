"""Text <-> token ids with a Hugging Face tokenizer: chat templates and
incremental detokenization.

Incremental detokenization follows vLLM's ``detokenize_incrementally``: the
text of new ids is the decode of a window of ids minus the decode of the
window's already-read part, and no text ends in U+FFFD (an incomplete UTF-8
character). Where vLLM emits nothing while the decode ends in one, this
emits the text up to the last id that completes a character: a speculative
round brings several ids at once and often ends inside a character (an
emoji is three of SmolLM2's ids), and holding the whole round back held a
stop string's match back with it, rounds past the stop. The last decode
(``final``) drops a character its ids leave incomplete, as vLLM never emits
one: a completion that ``max_tokens`` cuts inside an emoji ends before it,
not in U+FFFD. The window starts a few ids before the read offset so that
byte-level and SentencePiece merges see their left context.
"""

from __future__ import annotations

from pathlib import Path

ROLES = ("system", "user", "assistant")
CONTEXT_IDS = 5  # ids of left context kept in the window (vLLM's initial offset)


class TextTokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @classmethod
    def from_source(cls, source: str | Path) -> "TextTokenizer":
        """From a GGUF file (its embedded vocabulary and chat template) or a
        Hugging Face directory."""
        from transformers import AutoTokenizer

        source = Path(source)
        if source.is_dir():
            return cls(AutoTokenizer.from_pretrained(str(source)))
        return cls(AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, prompt: str) -> list[int]:
        return self.hf(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the chat template and open the assistant's turn."""
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}].role {m['role']!r} is not one of {list(ROLES)}")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def decode_incremental(
        self, window: list[int], read_offset: int, new_ids: list[int], final: bool = False
    ) -> tuple[str, list[int], int]:
        """(text of new_ids, next window, next read offset).

        ``window[:read_offset]`` has been emitted already; the rest of
        ``window`` and ``new_ids`` not yet.
        """
        ids = list(window) + list(new_ids)
        prefix = self.decode(ids[:read_offset])
        end, full = len(ids), self.decode(ids)
        # back off to the last id that ends a character (a UTF-8 character is at most 4 ids); the final
        # decode too, which then drops the incomplete character (with it, as in vLLM, trailing invalid bytes)
        floor = read_offset if final else read_offset + 1
        while end > floor and full.endswith("\ufffd") and len(ids) - end < 4:
            end -= 1
            full = self.decode(ids[:end])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return "", ids, read_offset
        keep = max(0, end - CONTEXT_IDS)
        return full[len(prefix):], ids[keep:], end - keep

    @staticmethod
    def initial_window(prompt_ids: list[int]) -> tuple[list[int], int]:
        """Window and read offset before the first generated id."""
        window = list(prompt_ids[-CONTEXT_IDS:])
        return window, len(window)

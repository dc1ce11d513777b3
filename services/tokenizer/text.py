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

import re
from functools import cached_property
from pathlib import Path

ROLES = ("system", "user", "assistant")
CONTEXT_IDS = 5  # ids of left context kept in the window (vLLM's initial offset)
SPACE_PIECE = "\u2581"  # SentencePiece's space
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback piece


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of each byte to a printable character (``encoder.py`` of
    openai/gpt-2, as byte-level BPE tokenizers spell their pieces): printable
    Latin-1 bytes stand for themselves, the rest for characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


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

    @cached_property
    def _byte_of(self) -> dict[str, int] | None:
        """Byte-level BPE's alphabet (GPT-2's ``bytes_to_unicode``, a printable character per byte) back to
        the bytes; None where the tokenizer is not byte-level (SentencePiece)."""
        backend = getattr(self.hf, "backend_tokenizer", None)  # a slow tokenizer has none
        if backend is None or type(backend.decoder).__name__ != "ByteLevel":
            return None
        return {char: byte for byte, char in bytes_to_unicode().items()}

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's own bytes (what a log-probability names), which may be
        part of a UTF-8 character (the third of an emoji's ids is no text
        alone): a byte-level piece maps back through its alphabet; a
        SentencePiece piece is its text with ``▁`` as a space, and a byte
        fallback piece (``<0xF0>``) its byte; an added or special token is
        its text."""
        added = set(self.hf.get_added_vocab().values())
        out = []
        for i, piece in zip(ids, self.hf.convert_ids_to_tokens(list(ids))):
            if i in added:
                out.append(piece.encode())
            elif self._byte_of is not None and all(c in self._byte_of for c in piece):
                out.append(bytes(self._byte_of[c] for c in piece))
            elif BYTE_PIECE.fullmatch(piece):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace(SPACE_PIECE, " ").encode())
        return out

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

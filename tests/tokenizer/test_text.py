"""Chat template and incremental detokenization with SmolLM2's tokenizer."""

import pytest

from arserve.core.weights import smollm2_gguf_path
from arserve.tokenizer.text import TextTokenizer


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_source(smollm2_gguf_path())


TEXTS = [
    "Hello, world! The quick brown fox.",
    "héllo wörld — naïve café, 世界你好, emoji 🙂👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "def f(x):\n    return x ** 2  # ✓\n",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 3])
def test_stream_concatenates_to_the_full_decode(tok, text, step):
    prompt = tok.encode_chat([{"role": "user", "content": "Say something."}])
    ids = tok.hf(text, add_special_tokens=False)["input_ids"]
    window, read = tok.initial_window(prompt)
    chunks = []
    for i in range(0, len(ids), step):
        final = i + step >= len(ids)
        piece, window, read = tok.decode_incremental(window, read, ids[i:i + step], final=final)
        chunks.append(piece)
        assert len(window) <= 5 + step + 4  # small: context + new ids + a held-back character (<= 4 bytes)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks), "a chunk ended inside a UTF-8 character"


def test_multibyte_characters_are_held_back_until_complete(tok):
    ids = tok.hf("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits the emoji
    window, read = [], 0
    out = []
    for i in ids:
        piece, window, read = tok.decode_incremental(window, read, [i])
        out.append(piece)
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🙂"


def test_chat_template_and_unknown_role(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    text = tok.hf.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    with pytest.raises(ValueError, match=r"messages\[0\].role 'robot'"):
        tok.encode_chat([{"role": "robot", "content": "Hi"}])


def test_encode_returns_the_first_detokenizer_state(tok):
    """The tokenizer service's Encode hands back the state the first DecodeIncremental starts
    from (the prompt's last CONTEXT_IDS ids, all read), so the gateway need not build it."""
    import asyncio

    from arserve.pb.v1 import tokenizer_pb2 as pb
    from arserve.tokenizer.service import TokenizerService
    from arserve.tokenizer.text import CONTEXT_IDS

    service = TokenizerService({"m": tok})
    prompt = "The quick brown fox jumps over the lazy dog, then"
    encoded = asyncio.run(service.Encode(pb.EncodeRequest(model="m", prompt=prompt)))
    ids = list(encoded.token_ids)
    assert len(ids) > CONTEXT_IDS
    assert list(encoded.state.window) == ids[-CONTEXT_IDS:] and encoded.state.read_offset == CONTEXT_IDS
    answer = tok.hf(" naps in the sun 🙂.", add_special_tokens=False)["input_ids"]
    decoded = asyncio.run(service.DecodeIncremental(pb.DecodeIncrementalRequest(
        model="m", state=encoded.state, token_ids=answer, final=True)))
    assert decoded.text == tok.decode(ids + answer)[len(tok.decode(ids)):] == " naps in the sun 🙂."


def test_a_round_that_ends_inside_a_character_releases_the_characters_before_it(tok):
    """A speculative round brings several ids at once and often ends inside
    an emoji (three ids each here). Its complete characters are released at
    once; only the unfinished one waits. Holding the whole round back held a
    stop string's match back with it: the decoder ran rounds past the stop."""
    ids = tok.hf("🌍🌍🌍🌍", add_special_tokens=False)["input_ids"]
    per = len(ids) // 4
    assert per > 1 and len(ids) == 4 * per
    window, read = tok.initial_window(tok.encode_chat([{"role": "user", "content": "Emojis."}]))
    out = []
    for start, stop in ((0, per + 1), (per + 1, 3 * per - 1), (3 * per - 1, len(ids))):  # rounds cut mid-emoji
        piece, window, read = tok.decode_incremental(window, read, ids[start:stop], final=stop == len(ids))
        out.append(piece)
    assert out == ["🌍", "🌍", "🌍🌍"]
    assert len(window) <= 5 + 4


def test_the_last_decode_drops_a_character_its_ids_leave_incomplete(tok):
    """A completion that max_tokens cuts inside an emoji ends before it, as
    vLLM's does, instead of in U+FFFD, whether the cut comes in a round of
    several ids or one at a time."""
    ids = tok.hf("ok 🌍🌍", add_special_tokens=False)["input_ids"]
    per = len(tok.hf("🌍", add_special_tokens=False)["input_ids"])
    assert per > 1
    for cut in range(1, per):  # the last emoji's first `cut` ids
        kept = ids[:len(ids) - per + cut]
        for step in (1, len(kept)):
            window, read = tok.initial_window(tok.encode_chat([{"role": "user", "content": "Emojis."}]))
            text = ""
            for i in range(0, len(kept), step):
                piece, window, read = tok.decode_incremental(window, read, kept[i:i + step],
                                                             final=i + step >= len(kept))
                text += piece
            assert text == "ok 🌍", (cut, step, text)


def test_a_tokens_bytes_are_its_own_even_inside_a_character(tok):
    """What a log-probability names: the bytes of each token, which join to the text (an emoji's three
    ids each hold part of its four bytes); a special token is its text."""
    from arserve.tokenizer.text import bytes_to_unicode

    alphabet = bytes_to_unicode()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256
    assert (alphabet[ord("a")], alphabet[ord(" ")], alphabet[ord("\n")]) == ("a", "\u0120", "\u010a")
    text = "Hello world 😀 é\nx"
    ids = tok.encode(text)
    pieces = tok.token_bytes(ids)
    assert b"".join(pieces).decode() == text
    assert any(not _decodes(p) for p in pieces)  # a piece of the emoji is no text alone
    assert tok.token_bytes([tok.hf.convert_tokens_to_ids("<|im_end|>")]) == [b"<|im_end|>"]


def _decodes(piece: bytes) -> bool:
    try:
        piece.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_sentencepiece_pieces_keep_their_spaces_and_fallback_bytes():
    """A SentencePiece vocabulary (Llama 2's kind: ``▁`` for a space, ``<0xF0>`` byte fallback pieces,
    a decoder that strips the leading space) built in memory: each piece's bytes, not its decoded text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\u2581world": 1, "<0xF0>": 2, "\u2581hi": 3, "<s>": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = TextTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>"))
    assert tok.token_bytes([3, 1, 2, 4]) == [b" hi", b" world", b"\xf0", b"<s>"]


def test_ids_past_the_tokenizers_vocabulary_have_no_bytes(tok):
    """A model may pad its logits past the tokenizer's vocabulary (Qwen's 151,936 rows for 151,665 ids):
    such an id among the most likely names no bytes rather than failing the request."""
    import asyncio

    from arserve.pb.v1 import tokenizer_pb2 as pb
    from arserve.tokenizer.service import TokenizerService

    hello = tok.encode("Hello")[0]
    out = asyncio.run(TokenizerService({"m": tok}).TokenBytes(
        pb.TokenBytesRequest(model="m", token_ids=[tok.vocab_size + 5, hello])))
    assert list(out.tokens) == [b"", b"Hello"]

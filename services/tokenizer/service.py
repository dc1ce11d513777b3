"""Tokenizer service: ``arserve.v1.Tokenizer`` over one TextTokenizer per model."""

from __future__ import annotations

from ..errors import InvalidArgument, NotFound
from ..pb.v1 import tokenizer_pb2 as pb
from ..wire import from_proto, to_proto
from .image import Patchifier
from .text import TextTokenizer


class TokenizerService:
    def __init__(self, tokenizers: dict[str, TextTokenizer], patchifiers: dict[str, Patchifier] | None = None):
        self.tokenizers = tokenizers
        self.patchifiers = patchifiers or {}  # image model id -> its image path

    def _get(self, model: str) -> TextTokenizer:
        try:
            return self.tokenizers[model]
        except KeyError:
            raise NotFound(f"model {model!r} has no tokenizer here; known: {sorted(self.tokenizers)}") from None

    async def Encode(self, req: pb.EncodeRequest, context=None) -> pb.EncodeResponse:
        tok = self._get(req.model)
        if req.messages:
            try:
                ids = tok.encode_chat([{"role": m.role, "content": m.content} for m in req.messages])
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
        else:
            ids = tok.encode(req.prompt)
        window, read_offset = tok.initial_window(ids)
        return pb.EncodeResponse(token_ids=ids, state=pb.DetokenizerState(window=window, read_offset=read_offset))

    async def DecodeIncremental(self, req: pb.DecodeIncrementalRequest, context=None) -> pb.DecodeIncrementalResponse:
        tok = self._get(req.model)
        if req.state.read_offset > len(req.state.window):
            raise InvalidArgument("state.read_offset is past the end of state.window")
        text, window, read = tok.decode_incremental(list(req.state.window), req.state.read_offset, list(req.token_ids), req.final)
        return pb.DecodeIncrementalResponse(text=text, state=pb.DetokenizerState(window=window, read_offset=read))

    async def TokenBytes(self, req: pb.TokenBytesRequest, context=None) -> pb.TokenBytesResponse:
        tok = self._get(req.model)  # a model may pad its logits past the vocabulary: those ids have no bytes
        known = [t for t in req.token_ids if t < tok.vocab_size]
        named = dict(zip(known, tok.token_bytes(known)))
        return pb.TokenBytesResponse(tokens=[named.get(t, b"") for t in req.token_ids])

    def _patchifier(self, model: str) -> Patchifier:
        try:
            return self.patchifiers[model]
        except KeyError:
            raise NotFound(f"model {model!r} has no image tokenizer here; known: {sorted(self.patchifiers)}") from None

    async def Patchify(self, req: pb.PatchifyRequest, context=None) -> pb.PatchifyResponse:
        p = self._patchifier(req.model)
        try:
            images = from_proto(req.image).float()
            single = images.dim() == 3
            tokens = p.patchify(images[None] if single else images)
        except ValueError as e:
            raise InvalidArgument(f"image: {e}") from None
        return pb.PatchifyResponse(tokens=to_proto(tokens[0] if single else tokens))

    async def Unpatchify(self, req: pb.UnpatchifyRequest, context=None) -> pb.UnpatchifyResponse:
        p = self._patchifier(req.model)
        try:
            tokens = from_proto(req.tokens).float()
            single = tokens.dim() == 2
            images = p.unpatchify(tokens[None] if single else tokens)
        except ValueError as e:
            raise InvalidArgument(f"tokens: {e}") from None
        return pb.UnpatchifyResponse(image=to_proto(images[0] if single else images))

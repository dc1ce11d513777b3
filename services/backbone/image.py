"""The backbone of continuous-token image models: ``arserve.v1.Backbone``'s
Score and Release for an ``ImageAR`` target (``arserve.core.image_model``).

A request is a batch of rows (its images; with classifier-free guidance also
their "no class" rows) with one KV cache (``ImageKV``) and a committed length
per row. Score appends the inputs of ``ImageScore.tokens`` after each row's
committed ones and answers their conditions z; the words are those of text
(``arserve.core.words``): what a call scores is tentative until the next call
names each row's committed length (``ImageScore.lengths``), which commits
what it keeps and rolls back the rest (overwritten by the next forward, as
``ImageKV`` does). So a round is one call; there is no Commit for images.

Continuous batching: Score calls that arrive while a forward runs join the
next forward when they share the model, the cache capacity and the number of
new positions (their rows and caches are concatenated; ``arserve.batching``),
as the text backbone's ``ForwardBatcher`` joins text calls. Alone, a call
runs exactly the forward the in-process loop ran (same shapes, same bits).

A request's cache lives on the replica that took its first call (the
verifier's ``ImageKVSession`` sticks to it). On another replica, or after its
lease expired (``arserve.leases``), the call fails with FAILED_PRECONDITION
unless it carries ``ImageScore.context``: then the cache is rebuilt from the
committed tokens in one forward.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..batching import JoinQueue
from ..core.image_model import ImageAR, ImageKV
from ..core import compute
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..leases import Leases, leased
from ..many import answer_each
from ..pb.v1 import backbone_pb2 as pb
from ..wire import from_proto, to_proto

MAX_DRAFT = 16  # the longest image draft (ImageModelSettings.num_draft_tokens): capacity = seq_len + this at most
MAX_ROWS = 2048  # rows one request may hold (the gateway allows max_images_per_request, twice with guidance)


@dataclass
class ImageSession:
    """One request's cache on this replica."""

    kv: ImageKV  # [n_layers, rows, capacity, ...] and lengths [rows]
    labels: torch.Tensor  # [rows] int64 class of each row
    written: torch.Tensor  # [rows] int64 positions holding values: committed plus the last call's tentative ones


@dataclass
class _Call:
    """One Score call's part of a forward; calls join by (model id, capacity, new positions)."""

    model: ImageAR
    session: ImageSession
    labels: torch.Tensor | None  # [rows] when the class input comes first (the first call), else None
    tokens: torch.Tensor  # [rows, m, token_dim] the token inputs


def embed(model: ImageAR, labels: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """Input embeddings [rows, p, dim] of the positions a call scores: the
    class (``labels``, first call), then the tokens [rows, m, token_dim] (the
    pending one, then the drafts), each row's the same bits whatever rows
    and calls it is embedded with (``ImageAR.embed_tokens``)."""
    x = model.embed_tokens(tokens)
    return torch.cat([model.class_embed(labels)[:, None], x], 1) if labels is not None else x


@torch.no_grad()
def _forward(batch: list[_Call]) -> list[torch.Tensor]:
    """One forward over every call's rows -> z [rows, p, dim] of each call."""
    model = batch[0].model
    dev = model.pos_embed.device  # the service boundary: inputs move to the model's device
    xs = [embed(model, None if c.labels is None else c.labels.to(dev), c.tokens.to(dev)) for c in batch]
    if len(batch) == 1:
        return [model(xs[0], batch[0].session.kv)]
    kvs = [c.session.kv for c in batch]
    kv = ImageKV(torch.cat([k.k for k in kvs], 1), torch.cat([k.v for k in kvs], 1),
                 torch.cat([k.lengths for k in kvs]))
    z = model(torch.cat(xs), kv)
    out, start = [], 0
    for c, x in zip(batch, xs):
        rows = x.shape[0]
        c.session.kv.k, c.session.kv.v = kv.k[:, start:start + rows], kv.v[:, start:start + rows]
        out.append(z[start:start + rows])
        start += rows
    return out


class ImageBackboneService:
    def __init__(self, models: dict[str, ImageAR], executor: ThreadPoolExecutor | None = None,
                 lease_s: float = 300.0):
        self.models = models  # model id -> target ImageAR
        self.executor = executor or compute.executor()
        self.sessions: dict[tuple[str, str], ImageSession] = {}  # (model, request) -> its cache
        self.leases = Leases(lease_s, self._free, "image_backbone")
        self.joins = JoinQueue(_forward, self.executor, "image_backbone")  # Score calls that share a forward

    def _model(self, model: str) -> ImageAR:
        try:
            return self.models[model]
        except KeyError:
            raise NotFound(f"image model {model!r} is not served by this backbone; "
                           f"known: {sorted(self.models)}") from None

    @leased(lambda req: (req.model, req.request_id))
    async def Score(self, req: pb.ScoreRequest, context=None) -> pb.ScoreResponse:
        model = self._model(req.model)
        c = model.config
        if not req.HasField("image"):
            raise InvalidArgument(f"model {req.model!r} is an image model: Score needs `image` (ImageScore)")
        labels, lengths, tokens = _parse(req.image, c)
        capacity = req.max_positions or c.seq_len + MAX_DRAFT
        if not c.seq_len <= capacity <= c.seq_len + MAX_DRAFT:
            raise InvalidArgument(f"max_positions {capacity}: an image request holds seq_len {c.seq_len} to "
                                  f"{c.seq_len + MAX_DRAFT} positions per row")
        first = bool((lengths == 0).all())
        if not first and bool((lengths == 0).any()):
            raise InvalidArgument("image.lengths: the class input is scored for every row at once (all 0 or none)")
        if not first and tokens.shape[1] == 0:
            raise InvalidArgument("image.tokens: nothing to score (needs the pending token of each row)")
        if int((lengths + tokens.shape[1] + first).max()) > capacity:
            raise InvalidArgument(f"image: scoring {tokens.shape[1] + first} positions after lengths up to "
                                  f"{int(lengths.max())} passes the cache's {capacity} positions")
        key = (req.model, req.request_id)
        session = await self._session(key, model, req, labels, lengths, capacity, first)
        if not torch.equal(session.labels, labels) or session.kv.k.shape[2] != capacity:
            raise InvalidArgument(f"request {req.request_id!r}: labels and max_positions must stay those of its "
                                  "first call")
        if bool((lengths > session.written).any()):
            raise InvalidArgument(f"image.lengths {lengths.tolist()} commit positions never scored (the cache holds "
                                  f"{session.written.tolist()})")
        session.kv.lengths = lengths.to(session.kv.k.device)  # commit what the verifier kept, roll back the rest
        call = _Call(model, session, labels if first else None, tokens)
        joins_with = (req.model, capacity, tokens.shape[1] + first)  # calls that can share one forward
        z = await self.joins.submit(joins_with, call, key)  # [rows, p, dim]
        session.written = lengths + z.shape[1]
        return pb.ScoreResponse(z=to_proto(z), length=int(session.written.max()), cached=0)

    async def _session(self, key, model: ImageAR, req: pb.ScoreRequest, labels, lengths, capacity: int,
                       first: bool) -> ImageSession:
        session = self.sessions.get(key)
        if session is not None:
            return session
        if not first and not req.image.HasField("context"):
            raise FailedPrecondition(f"request {req.request_id!r} has no KV cache on this backbone replica "
                                     "(released, freed after its lease, or another replica's): send image.context")
        kv = ImageKV.empty(model.config, labels.shape[0], capacity, model.pos_embed.device)
        session = ImageSession(kv, labels, torch.zeros_like(lengths))
        if not first:
            await self._rebuild(model, session, req.image.context, lengths)
        self.sessions[key] = session
        return session

    async def _rebuild(self, model: ImageAR, session: ImageSession, context, lengths: torch.Tensor) -> None:
        """The committed inputs of every row (class, then its first lengths - 1 tokens) in one forward."""
        c = model.config
        try:
            tokens = from_proto(context).float()
        except ValueError as e:
            raise InvalidArgument(f"image.context: {e}") from None
        need = int(lengths.max()) - 1
        if tokens.dim() != 3 or tokens.shape[0] != lengths.shape[0] or tokens.shape[2] != c.token_dim \
                or tokens.shape[1] < need:
            raise InvalidArgument(f"image.context must be [rows, >= {need}, {c.token_dim}], got {list(tokens.shape)}")
        await self.joins.submit(("rebuild", id(session)), _Call(model, session, session.labels,
                                                                tokens[:, :need].contiguous()))
        session.written = lengths.clone()

    async def ScoreMany(self, req: pb.ScoreManyRequest, context=None) -> pb.ScoreManyResponse:
        """Each call as ``Score``, started together (``arserve.many``)."""
        return pb.ScoreManyResponse(results=await answer_each(self.Score, req.calls, pb.ScoreResult))

    async def Commit(self, req: pb.CommitRequest, context=None) -> pb.CommitResponse:
        raise InvalidArgument(f"model {req.model!r} is an image model: its commits travel in the next Score call "
                              "(ImageScore.lengths)")

    async def Release(self, req: pb.ReleaseRequest, context=None) -> pb.ReleaseResponse:
        key = (req.model, req.request_id)
        self.leases.drop(key)
        await self._free(key)
        return pb.ReleaseResponse()

    async def _free(self, key: tuple[str, str]) -> bool:
        held = self.sessions.pop(key, None) is not None
        self.joins.left(key)
        return held


def _parse(image: pb.ImageScore, c) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> labels [rows], lengths [rows] (int64), tokens [rows, m, token_dim], checked."""
    rows = len(image.labels)
    if not 1 <= rows <= MAX_ROWS:
        raise InvalidArgument(f"image.labels: 1 to {MAX_ROWS} rows, got {rows}")
    if len(image.lengths) != rows:
        raise InvalidArgument(f"image.lengths has {len(image.lengths)} entries for {rows} rows")
    labels = torch.tensor(list(image.labels), dtype=torch.long)
    lengths = torch.tensor(list(image.lengths), dtype=torch.long)
    if int(labels.max()) > c.num_classes:
        raise InvalidArgument(f"image.labels must be 0 to {c.num_classes} (the last: no class), "
                              f"got {int(labels.max())}")
    if int(lengths.max()) > c.seq_len:
        raise InvalidArgument(f"image.lengths must be at most seq_len {c.seq_len}, got {int(lengths.max())}")
    if image.HasField("tokens"):
        try:
            tokens = from_proto(image.tokens).float()
        except ValueError as e:
            raise InvalidArgument(f"image.tokens: {e}") from None
    else:
        tokens = torch.empty(rows, 0, c.token_dim)
    if tokens.dim() != 3 or tokens.shape[0] != rows or tokens.shape[2] != c.token_dim:
        raise InvalidArgument(f"image.tokens must be [{rows}, m, {c.token_dim}], got {list(tokens.shape)}")
    if not bool(torch.isfinite(tokens).all()):
        raise InvalidArgument("image.tokens must be finite")
    return labels, lengths, tokens

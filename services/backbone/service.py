"""Backbone service: the target model and the KV cache of each request.

``Score`` runs one forward over new positions (prompt, one token, a draft
chain or tree); ``Commit`` keeps a path of them and rolls back the rest.
Continuous batching: Score calls that arrive while a forward runs join the
next forward together (``ForwardBatcher``), so concurrent requests share each
read of the weights. Forwards run on a dedicated thread, so the event loop
keeps serving while the model computes.

Memory: each request reserves its KV positions from the model's KV budget
when it enters the replica (``budget``), and a request's state idle longer
than a lease is freed (``arserve.leases``); a later call finds it lost and
the verifier resends its committed tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..core.kv_blocks import BlockSpace, block_keys
from ..core.kv_cache import KVCache
from ..core.kv_transfer import HostBlocks, to_host
from ..core.model import Llama, ScoreItem
from ..core import compute
from ..batching import JoinQueue
from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..leases import Leases, leased
from ..many import answer_each
from ..pb.v1 import backbone_pb2 as pb
from ..wire import to_proto
from .budget import BudgetConfig, KVBudget

log = logging.getLogger("arserve.backbone")

PREFILL_CHUNK = 1024  # positions: a long prompt is scored in forwards of this many (``BackboneService._prefill_chunks``)
# prompt rows a forward takes on a CPU (``ForwardBatcher``; decision 69): prompts that arrive together are
# scored a few at a time, so their first tokens come out one after another instead of all after the last
CPU_PREFILL_BATCH = 128


@dataclass
class RequestState:
    cache: KVCache
    committed: int = 0  # committed positions
    scored: int = 0  # tentative positions of the last Score call
    tokens: list[int] = field(default_factory=list)  # committed token ids (names the KV blocks)
    scored_tokens: list[int] = field(default_factory=list)  # token ids of the last Score call
    stored_blocks: int = 0  # leading blocks already handed to the KV store
    storing: list = field(default_factory=list)  # its KV stores still in flight (asyncio tasks)
    salt: str = ""  # the tenant's cache salt: its KV blocks' namespace ("" for the shared one)
    reserved: int = 0  # KV positions reserved from the model's budget (the cache's max_positions)


def tree_inputs(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """parents: parent index of each new token (-1 = committed prefix) ->
    (tree_mask [n, n] bool, depths [n] int64)."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    depths = torch.zeros(n, dtype=torch.long)
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise InvalidArgument(f"parents[{i}] = {p}: a parent must come before its child (or be -1)")
        if p >= 0:
            mask[i] |= mask[p]
            depths[i] = depths[p] + 1
    return mask, depths


class ForwardBatcher(JoinQueue[ScoreItem, torch.Tensor]):
    """Joins the Score calls queued for one model into one ``forward_batch``
    (``batching.JoinQueue``, one key for all: any calls can share a forward).

    A call waits only while a forward is already running; the calls queued
    meanwhile (up to ``max_batch_tokens`` new tokens) form the next batch,
    once the requests of the last forward are back (``batching.Cohort``: a
    decode step's requests all join the next step). Of these, prompts join
    while their prefill rows (those scored only for their keys and values,
    ``ScoreItem.logits_from``) sum to at most ``prefill_batch_tokens`` (None:
    no limit; always at least one prompt): on a CPU, where prefill is
    compute-bound, scoring prompts together saves nothing and makes the
    first of them wait for the last.
    """

    def __init__(self, model: Llama, executor: ThreadPoolExecutor, max_batch_tokens: int = 4096, name: str = "",
                 prefill_batch_tokens: int | None = None):
        super().__init__(self._forward, executor, name, size=lambda item: len(item.tokens), budget=max_batch_tokens,
                         prefill=lambda item: item.logits_from, prefill_budget=prefill_batch_tokens)
        self.model = model

    def _forward(self, items: list[ScoreItem]) -> list[torch.Tensor]:  # on the compute thread; looked up per run,
        # so a model whose forward_batch is wrapped later (tests count forwards) is the one called
        return self.model.forward_batch(items)

    async def score(self, item: ScoreItem, caller: Hashable | None = None) -> torch.Tensor:
        """``item``'s logits; ``caller`` (the request's key) is awaited by the next forward after this one."""
        return await self.submit(None, item, caller)


def _prefill_batch(tokens: int | None, model: Llama) -> int | None:
    """The prompt rows per forward for ``model``: -1 by its device (a GPU scores prompts together at
    little more than one's cost), 0 or None no limit."""
    if tokens == -1:
        return CPU_PREFILL_BATCH if model.device.type == "cpu" else None
    return tokens or None


class BackboneService:
    def __init__(self, models: dict[str, Llama], max_batch_tokens: int = 4096, kv_store=None,
                 spaces: dict[str, BlockSpace] | None = None, budget: BudgetConfig = BudgetConfig(),
                 lease_s: float = 300.0, prefill_chunk: int = PREFILL_CHUNK, prefill_batch_tokens: int | None = -1):
        """``prefill_batch_tokens``: prompt rows per forward (``ForwardBatcher``); -1 picks by the model's
        device (CPU_PREFILL_BATCH on a CPU, no limit on a GPU); None or 0: no limit."""
        self.models = models
        self.prefill_chunk = prefill_chunk  # a prompt's positions scored per forward (0: the whole prompt at once)
        self.kv_store = kv_store  # a TieredStore (process memory, Redis) or None
        self.spaces = spaces or {}  # model id -> the BlockSpace naming its KV blocks
        self.requests: dict[tuple[str, str], RequestState] = {}
        self._storing: set[asyncio.Task] = set()  # KV stores in flight
        self.executor = compute.executor()  # the process's compute thread (arserve.core.compute)
        self.batchers = {name: ForwardBatcher(m, self.executor, max_batch_tokens, name,
                                              _prefill_batch(prefill_batch_tokens, m)) for name, m in models.items()}
        self.budgets = {name: KVBudget(budget.capacity(m.config, m.dtype, len(models)), budget.queue, budget.wait_s,
                                       name) for name, m in models.items()}
        self.leases = Leases(lease_s, self._expire, "backbone")  # frees the caches of requests left idle

    def _model(self, model: str) -> Llama:
        try:
            return self.models[model]
        except KeyError:
            raise NotFound(f"model {model!r} is not served by this backbone; known: {sorted(self.models)}") from None

    @leased(lambda req: (req.model, req.request_id))
    async def Score(self, req: pb.ScoreRequest, context=None) -> pb.ScoreResponse:
        model = self._model(req.model)
        self._check_sizes(req, model.config.max_seq_len)
        key = (req.model, req.request_id)
        state = self.requests.get(key)
        if state is None:
            state = await self._admit(req, model)
        if not req.token_ids:
            raise InvalidArgument("token_ids is empty: nothing to score")
        cached = 0
        if state.committed == 0 and req.model in self.spaces:
            if req.start == 0 and req.commit and not req.parents:  # a prompt
                req = await self._reuse_prefix(req, state)
                cached = req.start
            elif 0 < req.start == len(req.context):  # a request another replica held (a resume)
                cached = await self._load_prefix(req.model, state, list(req.context), req.start)
        n = len(req.token_ids)
        if state.committed != req.start:
            if req.start < state.committed:
                state.cache.rollback(req.start)
                state.committed = req.start
            elif len(req.context) == req.start:  # rebuild from the context, keeping what matches it
                keep = state.committed if state.tokens == list(req.context[:state.committed]) else 0
                state.cache.rollback(keep)
                state.committed = keep
            else:
                raise FailedPrecondition(
                    f"request {req.request_id!r}: cache holds {state.committed} positions, caller expects {req.start}"
                )
            del state.tokens[state.committed:]
            space = self.spaces.get(req.model)
            state.stored_blocks = min(state.stored_blocks, state.committed // space.block_size) if space else 0
        context_ids = list(req.context[state.committed:req.start]) if state.committed < req.start else []
        ids = context_ids + list(req.token_ids)
        if max(ids) >= model.config.vocab_size:  # plain Python: this runs on the event loop, beside the forwards
            raise InvalidArgument(f"token id {max(ids)} is outside the vocabulary ({model.config.vocab_size})")
        tokens = torch.tensor(ids, dtype=torch.long)
        tree_mask = depths = None
        if req.parents:
            if len(req.parents) != n or context_ids:
                raise InvalidArgument("parents must have one entry per token_id (and no context)")
            tree_mask, depths = tree_inputs(list(req.parents))
        if req.outputs_from > n:
            raise InvalidArgument(f"outputs_from {req.outputs_from} > {n} scored positions")
        if state.committed + len(tokens) > model.config.max_seq_len:
            raise InvalidArgument(f"context window exceeded: {state.committed + len(tokens)} > {model.config.max_seq_len}")
        if state.committed + len(tokens) > state.reserved:
            raise InvalidArgument(f"request {req.request_id!r}: {state.committed + len(tokens)} positions exceed the "
                                  f"{state.reserved} it reserved (max_positions)")
        state.cache.rollback(state.committed)
        logits_from = len(context_ids) + req.outputs_from
        # a chain is scored with decoding's bits (row by row, in the decode stack's one C++ call), so greedy
        # speculative output is plain greedy's token for token, and a sampled round reads plain decoding's logits
        batcher = self.batchers[req.model]
        done = 0  # positions of `tokens` in the cache: a long prompt's leading chunks (``_prefill_chunks``)
        for end in self._prefill_chunks(len(tokens), logits_from, tree_mask is None):
            await batcher.score(ScoreItem(tokens[done:end], state.cache, logits_from=end - done), key)
            if self.requests.get(key) is not state:
                raise FailedPrecondition(f"request {req.request_id!r} was released while its prompt was scored")
            done = end
        item = ScoreItem(tokens[done:], state.cache, tree_mask, depths, logits_from - done,
                         want_hidden=req.return_hidden, want_argmax=req.argmax_only)
        logits = await batcher.score(item, key)
        state.tokens.extend(context_ids)
        if req.commit:
            state.tokens.extend(req.token_ids)
            state.committed = state.cache.length
            state.scored = 0
            self._store_blocks(req.model, state)
        else:
            state.committed += len(context_ids)
            state.scored = n
            state.scored_tokens = list(req.token_ids)
        hidden = to_proto(item.hidden) if req.return_hidden else None
        if req.argmax_only:
            return pb.ScoreResponse(argmax=item.argmax.tolist(), length=state.cache.length, cached=cached,
                                    hidden=hidden)
        return pb.ScoreResponse(logits=to_proto(logits), length=state.cache.length, cached=cached, hidden=hidden)

    def _prefill_chunks(self, n: int, logits_from: int, chain: bool) -> range:
        """Chunked prefill (Agrawal et al. 2024, "Sarathi-Serve"): the ends of
        the leading chunks of a Score call's ``n`` positions, each scored in a
        forward of its own before the rest. Only positions before the first
        output asked for are cut off (a prompt's: all but its last), in pieces
        of ``prefill_chunk``. Between two chunks the other requests' decode
        rows run, so a long prompt holds them up one chunk's forward at a
        time, not the whole prompt's. The cut depends only on the call, never
        on what else is running: a prompt is scored the same way alone and
        beside others."""
        if not self.prefill_chunk or not chain:
            return range(0)
        whole = min(logits_from, n - 1) // self.prefill_chunk * self.prefill_chunk
        return range(self.prefill_chunk, whole + 1, self.prefill_chunk)

    @staticmethod
    def _check_sizes(req: pb.ScoreRequest, window: int) -> None:
        """Lengths against the context window, before anything is allocated
        (a cache, the [n, n] tree mask): a caller cannot make the backbone
        build tensors of its choosing."""
        n = len(req.token_ids)
        if req.start + n > window or len(req.context) > window:
            raise InvalidArgument(f"context window exceeded: start {req.start} + {n} token_ids "
                                  f"({len(req.context)} context) > {window} positions")
        if req.parents and len(req.parents) != n:
            raise InvalidArgument(f"parents must have one entry per token_id: {len(req.parents)} != {n}")

    async def _admit(self, req: pb.ScoreRequest, model: Llama) -> RequestState:
        """A new request's state on this replica, once its positions are
        reserved from the model's KV budget (``KVBudget.reserve``: it may wait,
        or refuse). A call that continues a request (start > 0) without the
        context to rebuild its cache finds the cache lost instead."""
        if req.start > 0 and len(req.context) != req.start:
            raise FailedPrecondition(
                f"request {req.request_id!r} has no KV cache on this backbone replica (released, freed after its "
                f"idle lease, or held by another replica); resend its committed tokens as context")
        n = min(req.max_positions or model.config.max_seq_len, model.config.max_seq_len)
        budget = self.budgets[req.model]
        await budget.reserve(n)
        key = (req.model, req.request_id)
        if key in self.requests:  # another call created it while this one waited
            budget.free(n)
            return self.requests[key]
        state = self.requests[key] = RequestState(model.new_cache(n), reserved=n, salt=req.cache_salt)
        return state

    async def _expire(self, key: tuple[str, str]) -> bool:
        """The lease of a request's state ran out (``Leases``): free its cache and reservation -> whether
        there was one."""
        state = self.requests.pop(key, None)
        if state is not None:
            self.budgets[key[0]].free(state.reserved)
        return state is not None

    async def _reuse_prefix(self, req: pb.ScoreRequest, state: RequestState) -> pb.ScoreRequest:
        """Load the leading KV blocks of a prompt from the KV tiers; return the
        request for what is left to compute (at least one position, and every
        position whose outputs were asked for)."""
        # the positions kept: not the last (its forward gives the first token's logits), nor any whose outputs
        # were asked for. Blocks are looked up through one more position, so a prompt of exactly k blocks
        # loads all k and recomputes its last position, not its whole last block.
        keep = min(len(req.token_ids) - 1, req.outputs_from)
        reused = await self._load_prefix(req.model, state, list(req.token_ids), keep + 1, keep)
        if not reused:
            return req
        rest = pb.ScoreRequest()
        rest.CopyFrom(req)
        rest.start = reused
        del rest.token_ids[:]
        rest.token_ids.extend(req.token_ids[reused:])
        rest.outputs_from = req.outputs_from - reused
        return rest

    async def _load_prefix(self, model: str, state: RequestState, tokens: list[int], limit: int,
                           keep: int | None = None) -> int:
        """Fill an empty cache with the leading KV blocks of ``tokens`` found in
        the KV tiers (whole blocks within the first ``limit`` positions), of
        which the first ``keep`` positions at most stay (default: all); ->
        the positions kept."""
        space = self.spaces[model]
        keys = block_keys(space, tokens[:limit // space.block_size * space.block_size], state.salt)
        blocks = await self.kv_store.lookup(keys, space) if keys else []
        if not blocks:
            return 0
        state.cache.append_blocks(blocks)
        reused = min(len(blocks) * space.block_size, limit if keep is None else keep)
        state.cache.rollback(reused)  # the positions past it are computed again, to the same tokens
        state.committed = reused
        state.tokens = tokens[:reused]
        state.stored_blocks = len(blocks)
        return reused

    def _store_blocks(self, model: str, state: RequestState) -> None:
        """Hand newly completed committed blocks (copies) to the KV tiers, in
        the background: a Score call never waits for Redis; the request's
        Release does, so a finished request's blocks are there for the next."""
        space = self.spaces.get(model)
        if self.kv_store is None or space is None:
            return
        full = state.committed // space.block_size
        if full <= state.stored_blocks:
            return
        keys = block_keys(space, state.tokens[:full * space.block_size], state.salt)
        host = to_host(state.cache, range(state.stored_blocks, full), space.block_size)  # device -> host, async
        task = asyncio.create_task(self._store(keys[state.stored_blocks:full], host))
        state.stored_blocks = full
        self._storing.add(task)
        task.add_done_callback(self._stored)
        state.storing = [t for t in state.storing if not t.done()] + [task]

    async def _store(self, keys: list[str], host: HostBlocks) -> None:
        """Hand blocks to the KV tiers once their copies to the host are done."""
        await self.kv_store.store(dict(zip(keys, await host.ready())))

    def _stored(self, task: asyncio.Task) -> None:
        self._storing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("storing KV blocks failed: %r", task.exception())

    async def flush(self) -> None:
        """Wait for the KV blocks still being stored (tests, shutdown)."""
        while self._storing:
            await asyncio.gather(*self._storing, return_exceptions=True)

    async def ScoreMany(self, req: pb.ScoreManyRequest, context=None) -> pb.ScoreManyResponse:
        """Each call as ``Score``, started together (``arserve.many``)."""
        return pb.ScoreManyResponse(results=await answer_each(self.Score, req.calls, pb.ScoreResult))

    @leased(lambda req: (req.model, req.request_id))
    async def Commit(self, req: pb.CommitRequest, context=None) -> pb.CommitResponse:
        state = self.requests.get((req.model, req.request_id))
        if state is None:
            raise NotFound(f"request {req.request_id!r} has no KV cache on this backbone")
        path = list(req.path)
        if any(i >= state.scored for i in path):
            raise InvalidArgument(f"path {path} points past the {state.scored} scored positions")
        state.cache.keep(state.committed, path)
        state.tokens.extend(state.scored_tokens[i] for i in path)
        state.committed = state.cache.length
        state.scored = 0
        self._store_blocks(req.model, state)
        return pb.CommitResponse(length=state.committed)

    async def Release(self, req: pb.ReleaseRequest, context=None) -> pb.ReleaseResponse:
        key = (req.model, req.request_id)
        state = self.requests.pop(key, None)
        self.leases.drop(key)
        if req.model in self.batchers:
            self.batchers[req.model].left(key)
        if state is not None:
            self.budgets[req.model].free(state.reserved)
        if state is not None and state.storing:
            # shielded: a caller that gives up on Release must not cancel the stores
            await asyncio.shield(asyncio.gather(*state.storing, return_exceptions=True))
        return pb.ReleaseResponse()

"""Concurrent image requests decoding together. ``PlainSteps`` steps every
plain request of one kind in one loop (one Score call and one head call a
step for all of them, as vLLM's scheduler owns its running requests'
steps); ``Rounds`` starts the rounds of speculative requests of one kind
together, each in its own loop, so that their calls travel joined
(docs/decisions.md, decision 56)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import deadlines
from ..core.image_model import ImageConfig
from ..drafter.image import twice as _twice
from ..errors import DeadlineExceeded, Unavailable
from .image_job import ImageKVSession, ImageStats, Request

if TYPE_CHECKING:
    from .image import ImageVerifier

log = logging.getLogger("arserve.verifier")


class Rounds:
    """Speculative image requests of one kind (model, steps, temperature,
    guidance) start their rounds together, so that each phase's calls
    (Propose, Score, VerifyDrafts) start in one
    event-loop iteration and travel as one (``arserve.many``, ``HeadCalls``):
    the loops of concurrent requests are otherwise out of phase (they arrive
    apart, and their verdicts take different times), and their calls met
    one or two at a time (docs/decisions.md, decision 56).

    A request at the start of a round waits until every other request of its
    kind is at the start of one too, but never longer than twice the kind's
    recent round time (``GRACE_ROUNDS``; between ``MIN_GRACE_S`` and
    ``MAX_GRACE_S``): a request whose round runs long costs the others that
    much once. Each request's loop stays its own: its draws and its images
    are those it makes alone."""

    GRACE_ROUNDS = 2.0
    MIN_GRACE_S, MAX_GRACE_S = 0.01, 0.2
    FIRST_ROUND_S = 0.05  # a kind's round time before one is measured

    def __init__(self):
        self.members: dict[tuple, set[str]] = {}  # kind -> its requests decoding now
        self.waiting: dict[tuple, dict[str, asyncio.Future]] = {}  # kind -> those at a round's start
        self.round_s: dict[tuple, float] = {}  # kind -> its recent round time (moving average)
        self.released: dict[tuple, float] = {}  # kind -> when its last round started
        self.together = 0  # rounds started together (every request of the kind)
        self.timed_out = 0  # waits that ended at the grace time

    def join(self, kind: tuple, who: str) -> None:
        self.members.setdefault(kind, set()).add(who)

    def leave(self, kind: tuple, who: str) -> None:
        members = self.members.get(kind, set())
        members.discard(who)
        if not members:
            for d in (self.members, self.waiting, self.round_s, self.released):
                d.pop(kind, None)
            return
        self._release(kind)

    async def start(self, kind: tuple, who: str) -> None:
        if len(self.members.get(kind, ())) <= 1:
            return
        waiting = self.waiting.setdefault(kind, {})
        waiting[who] = done = asyncio.get_running_loop().create_future()
        self._release(kind)
        grace = min(self.MAX_GRACE_S, max(self.MIN_GRACE_S,
                                          self.GRACE_ROUNDS * self.round_s.get(kind, self.FIRST_ROUND_S)))
        try:
            async with asyncio.timeout(grace):
                await done
        except TimeoutError:
            self.timed_out += 1
        finally:
            if waiting.get(who) is done:
                del waiting[who]

    def _release(self, kind: tuple) -> None:
        waiting = self.waiting.get(kind)
        if not waiting or not self.members.get(kind, set()) <= waiting.keys():  # not everyone at a round's start
            return
        now = time.monotonic()
        if kind in self.released:
            last = now - self.released[kind]
            self.round_s[kind] = 0.7 * self.round_s.get(kind, last) + 0.3 * last
        self.released[kind] = now
        self.together += 1
        for done in waiting.values():
            if not done.done():
                done.set_result(None)
        waiting.clear()


@dataclass
class _Plain:
    """One plain request in the step loop of its kind."""

    r: Request
    kv: ImageKVSession
    tokens: torch.Tensor  # [n, seq_len, token_dim]
    done: asyncio.Future  # -> (tokens, ImageStats)
    deadline: float | None  # its deadline (arserve.deadlines; None: none)
    committed: int = 0  # tokens committed per image (a plain request's images advance together)
    last: torch.Tensor | None = None  # [rows, token_dim] the pending token (None: the class is pending)
    scoring: asyncio.Task | None = None  # its Score call, while it runs (it may outlast a step)
    releasing: asyncio.Task | None = None  # its KV release, once it left


class PlainSteps:
    """Steps every plain image request of one kind (model, steps, temperature,
    guidance) together, as vLLM's scheduler steps all its running requests:
    each step scores every request's pending input (their Score calls travel
    as one ``Backbone.ScoreMany``: one forward) and samples all their rows in
    one head call per head replica. A request joins at the next step after
    it arrives and leaves when its images are complete, so none waits for
    company, and a lone request runs as it always did.

    Eight requests of one image each, stepped by their own loops, paid every
    call's overhead eight times a step (protobuf tensors, the hand-over to a
    compute thread, a gRPC hop in the Ray wiring) and met in the services'
    batchers only by waiting for each other; stepped here, they cost close to
    one request of eight images (docs/decisions.md, decision 56).

    A request's images depend only on the request: its noise comes from its
    own generator, drawn as it would be alone, and every computation of a row
    is batch-invariant (the backbone's token embedding and blocks, the head's
    steps). A step's calls carry the latest of its requests' deadlines. An
    error of a request's backbone call is that request's; an error of the
    step's head call is every request's in that step. A request whose caller
    went away leaves at the next step; when every request of a step has left,
    the step's calls are cancelled (and a new loop steps whoever arrived
    meanwhile)."""

    STRAGGLER_S = 0.02  # a step waits for its last Score calls at least this long after the first ended

    def __init__(self, verifier: ImageVerifier):
        self.v = verifier
        self.members: dict[tuple, list[_Plain]] = {}  # kind -> its requests being stepped
        self.loops: dict[tuple, asyncio.Task] = {}  # kind -> its step loop
        self.stepping: dict[tuple, list[_Plain]] = {}  # kind -> the requests of its step in flight
        self._releases: set[asyncio.Task] = set()  # KV releases in flight
        self.steps = 0  # steps run
        self.requests_stepped = 0  # requests times the steps they took part in

    async def run(self, r: Request, c: ImageConfig) -> tuple[torch.Tensor, ImageStats]:
        """Request r's images, decoded plainly -> tokens [n, seq_len, token_dim] and its counters."""
        job = r.job
        key = r.kind
        m = _Plain(r, ImageKVSession(self.v.backbone, r.ids["request_id"], r.ids["model"]),
                   torch.empty(job.labels.shape[0], c.seq_len, c.token_dim), asyncio.get_running_loop().create_future(),
                   deadlines.DEADLINE.get())
        self.members.setdefault(key, []).append(m)
        loop = self.loops.get(key)
        if loop is None or loop.done() or loop.get_loop() is not asyncio.get_running_loop():
            self._start(key, c)
        try:
            out = await m.done
        except asyncio.CancelledError:  # the caller went away (its deadline, a disconnect)
            loop = self.loops.get(key)
            if loop is not None and all(x.done.done() for x in self.stepping.get(key, ())):
                loop.cancel()  # nobody of the step is left: its calls end (a new loop takes who arrived since)
            raise
        if m.releasing is not None:  # its cache freed before it returns, as a request alone frees its own
            await asyncio.shield(m.releasing)
        return out

    def _start(self, key: tuple, c: ImageConfig) -> None:
        # a context of its own: the loop outlives the request that started it, and carries no one's deadline
        self.loops[key] = asyncio.get_running_loop().create_task(self._loop(key, c), context=contextvars.Context())

    async def _loop(self, key: tuple, c: ImageConfig) -> None:
        members = self.members[key]
        try:
            while True:
                for m in [m for m in members if m.done.done()]:  # callers that went away
                    self._leave(members, m)
                now = time.monotonic()
                for m in [m for m in members if m.deadline is not None and m.deadline <= now]:
                    self._finish(members, m, error=DeadlineExceeded(
                        "the request's deadline passed while its images were decoded (the client's timeout or "
                        "the server's max_request_s)"))
                if not members:
                    return
                step = self.stepping[key] = list(members)
                ends = [m.deadline for m in step]
                deadlines.DEADLINE.set(None if None in ends else max(ends))  # this step's calls carry it
                self.steps += 1
                self.requests_stepped += len(step)
                scored = []
                for m, z in await self._scores(step):
                    if isinstance(z, BaseException):
                        self._finish(members, m, error=z)
                    else:
                        scored.append((m, z))
                if not scored:
                    continue
                new = await asyncio.gather(*(self._sample(m, z) for m, z in scored), return_exceptions=True)
                for (m, _), t in zip(scored, new):  # t: [n, token_dim], or the error of this request's sample
                    if isinstance(t, BaseException):
                        self._finish(members, m, error=t)
                        continue
                    m.tokens[:, m.committed] = t
                    m.committed += 1
                    m.last = _twice(t, m.r.job.guided)
                    if m.committed == c.seq_len:
                        self._finish(members, m)
        except Exception as e:  # a bug in the loop: its requests fail with it
            for m in list(members):
                self._finish(members, m, error=e)
            raise
        finally:
            for m in members:  # a new loop starts their calls again
                if m.scoring is not None:
                    m.scoring.cancel()
                    m.scoring = None
            for m in [m for m in members if m.done.done()]:  # left (or the loop was cancelled): free their caches
                self._leave(members, m)
            if self.loops.get(key) is asyncio.current_task():
                del self.loops[key]
                self.stepping.pop(key, None)
            if any(not m.done.done() for m in members):  # joined while the loop was being cancelled
                self._start(key, c)
            elif not members:
                del self.members[key]

    async def _scores(self, step: list[_Plain]) -> list[tuple[_Plain, torch.Tensor | BaseException]]:
        """The step's Score calls (started together: one ScoreMany) -> the requests whose
        call ended, with z or the error. A call that is still going once the others
        have ended and as long again as the first one took (a request resuming on
        another replica, with backoff) does not hold the step: its request samples in
        a later step, and the others' steps do not wait on its replica."""
        for m in step:
            if m.scoring is None:
                m.scoring = asyncio.get_running_loop().create_task(self._score(m))
        tasks = {m.scoring: m for m in step}
        t = time.monotonic()
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            more, pending = await asyncio.wait(pending, timeout=max(self.STRAGGLER_S, time.monotonic() - t))
            done |= more
        out = []
        for task in done:
            m = tasks[task]
            m.scoring = None
            out.append((m, task.exception() or task.result() if not task.cancelled() else Unavailable(
                "the request's backbone call was cancelled")))
        return out

    async def _score(self, m: _Plain) -> torch.Tensor:
        """The request's plain round on the backbone: commit what it has, score its pending input -> z [rows, 1, dim]."""
        guided = m.r.job.guided
        lengths = _twice(torch.full((m.tokens.shape[0],), m.committed, dtype=torch.long), guided)
        return await self.v._score(m.r, m.kv, lengths, m.last, None, _twice(m.tokens, guided))

    async def _sample(self, m: _Plain, z: torch.Tensor) -> torch.Tensor:
        """The request's tokens [n, token_dim] for z [rows, 1, dim] (joined with the step's others)."""
        return await self.v._sample(m.r, z[:, 0], m.tokens.shape[2])

    def _finish(self, members: list[_Plain], m: _Plain, error: BaseException | None = None) -> None:
        if not m.done.done():
            if isinstance(error, asyncio.CancelledError):  # a call of its own was cancelled, not its caller
                m.done.set_exception(Unavailable(f"image request {m.r.ids['request_id']}: a call to a service was "
                                                 "cancelled"))
            elif error is not None:
                m.done.set_exception(error)
            else:
                n, rounds = m.tokens.shape[0], m.committed
                m.done.set_result((m.tokens, ImageStats(rounds=rounds, row_rounds=n * rounds, plain=n * rounds,
                                                        draft_rate=m.r.job.prior_rate)))
        self._leave(members, m)

    def _leave(self, members: list[_Plain], m: _Plain) -> None:
        """m leaves the loop; its KV cache is released (in a task of its own: the others step on, and
        its caller awaits it before returning)."""
        if m not in members:
            return
        members.remove(m)
        if m.scoring is not None:
            m.scoring.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the event loop is gone (shutdown): the replica frees it after its lease
            return
        task = m.releasing = loop.create_task(self._release(m), context=contextvars.Context())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    @staticmethod
    async def _release(m: _Plain) -> None:
        try:
            await m.kv.release()
        except Exception:  # noqa: BLE001 - the replica frees it after its lease
            log.debug("image request %s: KV release failed", m.r.ids["request_id"], exc_info=True)

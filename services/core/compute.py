"""One compute thread per process: every forward, draft, head run and model
load of a process runs on it (``executor()``, ``call``).

Why: torch parallelizes CPU ops with OpenMP, and libgomp gives each thread
that opens a parallel region a team of worker threads of its own, kept for
the life of that thread. Once a process holds more OpenMP threads than CPUs,
libgomp stops spinning between parallel regions (its "throttled" spin count)
and each region waits for its workers to wake from a futex. A SmolLM2 decode
step opens some 600 regions: on this project's 2-core machines it went from
41-44 ms to 53-56 ms for good as soon as a second thread had run a single
parallel op, even a softmax over one row of logits (docs/decisions.md,
"One compute thread"). So:

- the compute thread runs with the process's torch threads (``start``);
- every thread that first touches torch after ``start`` (the event loop,
  gRPC's threads) runs its tensor ops on one thread, without a team: the
  verifier's sampling and the wire's conversions are small.

And its freed memory stays its own (``keep_freed_blocks``): glibc's malloc
maps a block above a size threshold from the kernel and unmaps it on free
(the threshold rises as such blocks come and go), and a thread's arena
gives the free memory at its heap's top back (MADV_DONTNEED) beyond twice
that threshold. A forward frees some 35 MB of activations a layer (a
1,000-token prompt's [1000, 3072] float32 `w_gate_up` output alone is
12 MB), so on the compute thread they came as fresh pages, faulted in and
zeroed on first touch, layer after layer: 50-70 ms of a 1.25 s float32
prefill (the same forward on the main thread took 1.22-1.26 s, on the
compute thread 1.30-1.33; with blocks kept, 1.22-1.25).

The words: *the compute thread* is this module's one executor thread;
*torch threads* are its OpenMP threads (``ServerSettings.torch_threads``,
each Ray deployment's ``torch_threads``).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

log = logging.getLogger("arserve.core")
T = TypeVar("T")

DEFAULT_THREADS = torch.get_num_threads()  # torch's own default (one per core, or OMP_NUM_THREADS), read before start
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread: threading.Thread | None = None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks up to this come from the heap (glibc's largest threshold on 64-bit)
TRIM_THRESHOLD = 128 << 20  # free memory at a heap's top kept rather than given back


def keep_freed_blocks() -> bool:
    """Have malloc keep freed blocks up to ``MMAP_THRESHOLD`` for the next
    allocation, in every thread's arena, rather than unmap them (their pages
    would fault in again). The cost: up to ``TRIM_THRESHOLD`` of freed memory
    per heap stays with the process, as with the allocators vLLM recommends
    on CPUs (tcmalloc). False where the C library has no ``mallopt`` (not
    glibc) or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _own(threads: int) -> None:
    """In the compute thread: take ``threads`` torch threads, and fix them
    (torch reads a thread's count lazily, from the process default, on its
    first parallel op; reading it now keeps this one)."""
    global _thread
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    _thread = threading.current_thread()


def start(threads: int | None = None) -> ThreadPoolExecutor:
    """Start the compute thread with ``threads`` torch threads (default:
    torch's, one per core), or give an already started one that many; from
    then on other threads that start using torch do so single-threaded.
    Call it before the process's first tensor work (the server wirings do)."""
    global _executor
    with _lock:
        if _executor is None:
            if not keep_freed_blocks():
                log.info("malloc keeps its default thresholds (no glibc mallopt): large blocks are mapped anew")
            _executor = ThreadPoolExecutor(1, thread_name_prefix="arserve-compute")
        n = threads or DEFAULT_THREADS
        _executor.submit(_own, n).result()
        # the process default, set from a thread of its own: the caller's own count stays as it is
        quiet = threading.Thread(target=torch.set_num_threads, args=(1,), name="arserve-torch-default")
        quiet.start()
        quiet.join()
        log.debug("compute thread: %d torch threads; other threads: 1", n)
        return _executor


def quiet() -> None:
    """The calling thread runs its tensor ops on one thread from now on
    (for a thread that was using torch before ``start`` and now runs an event
    loop: ``arserve serve``'s main thread). No-op on the compute thread."""
    if threading.current_thread() is not _thread:
        torch.set_num_threads(1)


def executor() -> ThreadPoolExecutor:
    """The compute thread (started with the default count on first use)."""
    return _executor if _executor is not None else start()


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the compute thread, waited for (loading
    models from synchronous code); inline when already on it."""
    ex = executor()
    if threading.current_thread() is _thread:
        return fn(*args, **kwargs)
    return ex.submit(fn, *args, **kwargs).result()

"""One compute thread per process (``arserve.core.compute``): it runs with
the process's torch threads, and the threads that touch torch after it
started (the event loop's sampling, gRPC's conversions) open no OpenMP team
of their own, the team that made every decode step wait (decision 40)."""

import subprocess
import sys

SCRIPT = r"""
import os, threading, torch
from arserve.core import compute

compute.start(2)
compute.call(lambda: torch.randn(256, 4096).softmax(-1))  # the compute thread's own team
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
done, leave, seen = threading.Event(), threading.Event(), []

def sample():  # what the verifier does with a sampled request's logits, on the event loop's thread
    logits = torch.randn(1, 49152)
    torch.softmax(logits / 0.7, -1), torch.sort(logits, descending=True), logits.argmax(-1)
    seen.append(torch.get_num_threads())
    done.set()
    leave.wait()

t = threading.Thread(target=sample)
t.start()
done.wait()
during = tasks()
leave.set()
t.join()
print(during - before, seen[0], compute.call(torch.get_num_threads), compute.call(compute.call, lambda: 7))
"""


def test_other_threads_open_no_openmp_team_and_the_compute_thread_keeps_its_threads():
    """In a fresh interpreter: a thread that samples from a row of logits
    after ``start`` adds only itself to the process (no OpenMP workers: before,
    it added one), runs single-threaded, and the compute thread keeps its 2
    threads; ``call`` from the compute thread runs inline (no deadlock)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    added, other, compute_threads, nested = map(int, out.stdout.split())
    assert (added, other, compute_threads, nested) == (1, 1, 2, 7)


SERVE = r"""
import asyncio, torch
from arserve.embedded import serve
from arserve.settings import ModelSettings, ServerSettings

torch.randn(256, 4096).softmax(-1)  # this thread used torch before serving, as `arserve serve`'s main thread may
before = torch.get_num_threads()
seen = []

async def main():
    stop = asyncio.Event()

    def on_port(port):  # on the thread that runs the event loop, once serving
        seen.append(torch.get_num_threads())
        stop.set()
    models = [ModelSettings(speculative_methods=["none"])]  # SmolLM2, from its package
    await serve(ServerSettings(port=0, models=models, image_models=[]), on_port=on_port, stop=stop)

asyncio.run(main())
print(before, seen[0])
"""


def test_the_thread_that_serves_runs_its_tensor_ops_on_one_thread():
    """`arserve serve` runs its event loop (the verifier's sampling) on the
    main thread, which started with torch's default thread count: serving
    turns it to one, or its OpenMP team beside the compute thread's slowed
    every decode step by a fifth (`arserve serve` 15 tok/s against 19 with
    the loop on a thread of its own)."""
    out = subprocess.run([sys.executable, "-c", SERVE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, serving = map(int, out.stdout.split())
    assert before >= 2 and serving == 1


HEAP = r"""
import ctypes, sys

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
if sys.argv[1] == "start":
    from arserve.core import compute
    compute.start(1)
mapped = libc.mallinfo2().hblkhd
block = libc.malloc(20 << 20)  # a long prompt's activations are blocks of this size
print((libc.mallinfo2().hblkhd - mapped) >> 20)
"""


def test_the_compute_threads_large_blocks_come_from_the_heap_and_stay_there():
    """A 20 MB block: glibc maps it anew from the kernel by default (and unmaps it on free, so its pages fault
    and are zeroed again on every use: 50-70 ms of a 1,000-token prefill on the compute thread); once a server
    process has started its compute thread (``compute.keep_freed_blocks``), it comes from the heap."""
    mapped = {}
    for mode in ("default", "start"):
        out = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        mapped[mode] = int(out.stdout)
    assert mapped == {"default": 20, "start": 0}

"""llama.cpp as a batch-1 peer of the vLLM comparison (issue 19: plain fp32
batch 1 against llama.cpp f32, "reported; at least 0.75x").

llama.cpp is the fastest CPU engine measured on machines of this class, so it
is the roofline's practical stand-in. It runs through ``llama-cpp-python``
(``make install-llamacpp`` builds it into the bench environment with its AMX
path off, as the issue asks), in a worker process of its own so that neither
engine shares an interpreter with the bench's client threads.

* **Same weights.** arserve dequantizes the packaged Q4_1 GGUF to float32 at
  load (``core.weights.read_gguf``); ``export_f32`` writes exactly those
  float32 values into a GGUF of type F32, every other field copied, so the
  two engines multiply the same numbers.
* **Same prompt.** The worker formats the chat with the GGUF's own chat
  template (llama-cpp-python's ``Jinja2ChatFormatter``), tokenizes it with the
  GGUF's vocabulary and decodes greedily to ``max_tokens`` or end of text.
* **Same clock, minus the server.** The bench times a request from sending it
  to the worker to its reply (prefill included), as it times arserve's from the
  SDK call to its return; llama.cpp pays no gRPC, gateway or detokenizer, so
  the ratio leans towards llama.cpp.
* **No prefix cache.** Every request starts from an empty KV cache (``reset``),
  as arserve's bench prompts do.

The worker speaks JSON lines on stdin/stdout (no pickle): a request
``{"messages": [...], "max_tokens": n}``, a reply ``{"token_ids": [...],
"ttft_s": t, "total_s": t}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .text import Run

F32_NAME = "SmolLM2-135M-Instruct.f32.gguf"


def available() -> bool:
    """Whether llama-cpp-python is installed in this environment."""
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def export_f32(src: str | Path, dst: str | Path) -> Path:
    """A copy of GGUF ``src`` with every tensor dequantized to F32 (the values
    arserve's loader computes), every other field kept."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:  # [rows, cols] float32, as read_gguf dequantizes them
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def f32_gguf() -> Path:
    """The F32 export of the packaged SmolLM2 GGUF, written once beside arserve's other caches."""
    from arserve.core.weights import smollm2_gguf_path

    dst = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arserve" / F32_NAME
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".tmp")
        export_f32(smollm2_gguf_path(), tmp)
        tmp.rename(dst)
    return dst


class Peer:
    """A llama.cpp worker process serving one request at a time."""

    def __init__(self, gguf_path: Path, threads: int | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arserve.bench.llamacpp", str(gguf_path), str(threads or os.cpu_count())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline() or "{}")
        if "system_info" not in hello:
            raise RuntimeError(f"the llama.cpp worker did not start (exit {self.proc.poll()})")
        self.system_info = hello["system_info"]

    def run(self, messages: list[dict], max_tokens: int) -> Run:
        t = time.perf_counter()
        self.proc.stdin.write(json.dumps({"messages": messages, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        wall = time.perf_counter() - t
        n = len(r["token_ids"])
        decode_s = r["total_s"] - r["ttft_s"]
        return Run(token_ids=r["token_ids"], tokens=n, wall_s=wall, tok_s=n / wall if wall > 0 else 0.0,
                   ttft_s=r["ttft_s"], decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else None,
                   mean_accepted_length=1.0)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _worker(path: str, threads: int) -> None:
    """The worker's loop: JSON lines in, JSON lines out."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    meta = llm.metadata
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llm.detokenize([llm.token_bos()], special=True).decode() if llm.token_bos() >= 0 else ""
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    chat = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    out = sys.stdout
    out.write(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        prompt = llm.tokenize(chat(messages=req["messages"]).prompt.encode(), add_bos=False, special=True)
        llm.reset()  # an empty KV cache: no prefix reuse across requests
        ids, t0, ttft = [], time.perf_counter(), None
        for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if llama_cpp.llama_vocab_is_eog(vocab, tok):  # end of text: not a generated token
                break
            ids.append(int(tok))
            if len(ids) >= req["max_tokens"]:
                break
        out.write(json.dumps({"token_ids": ids, "ttft_s": ttft or 0.0, "total_s": time.perf_counter() - t0}) + "\n")
        out.flush()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))

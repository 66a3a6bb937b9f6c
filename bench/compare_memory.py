"""Peak memory of `sali compare`'s teacher-forced stage for 100 and 1,000 prompts.

Each size runs in its own subprocess (so one run's memory cannot hide in another's): it builds
the compare plan of ``sali compare --base B -H head --aligned A`` (systems base, base+head,
aligned; a random head of k 16, rank 8), gives every prompt an aligned response of ``--tokens``
random token ids (the stage reads responses, it does not generate them), runs
:func:`sali.compare.teacher_forced` and reports the process's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``): everything the process touched at its peak, llama.cpp's
native buffers (weights, KV cache, logits) as well as Python and NumPy objects, which is what
a user's machine must hold. tracemalloc would see only Python/NumPy allocations, not llama.cpp's.
The figure printed is the ratio of the two peaks; it must stay under 1.2.

    python bench/compare_memory.py                       # the tiny test pair (built once into bench/.cache)
    python bench/compare_memory.py --base B.gguf --aligned A.gguf [--sizes 100 1000] [--tokens 32]
    python bench/compare_memory.py --quick --base B.gguf --aligned A.gguf   # seconds: the suite's smoke run
    python bench/compare_memory.py --against /path/to/other/checkout      # also measure that tree's sali
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache" / "tiny-pair"


def child(args: argparse.Namespace) -> None:
    """One measurement, in this process: print a JSON line with the peak RSS (KiB) and seconds."""
    import numpy as np

    from sali import compare as cmp
    from sali.head import Head
    from sali.prompts import Prompt
    from sali.runtime import Model, Sampling

    folder = Path(tempfile.mkdtemp(prefix="sali-compare-memory-"))
    probe = Model(args.base, n_threads=1, n_ctx=64)
    V, fingerprint = probe.n_vocab, probe.fingerprint
    probe.close()
    rng = np.random.default_rng(0)
    head_path = folder / "head.npz"
    Head.create(rng.standard_normal((V, 8)).astype(np.float32) * 0.3, rng.standard_normal((V, 8)).astype(np.float32) * 0.3,
                np.zeros(V, np.float32), rng.choice(V, 8, replace=False), k=16, vocab_fingerprint=fingerprint).save(head_path)
    systems = cmp.build_systems(args.base, [head_path], args.aligned, [], None, None, None)
    prompts = [Prompt(f"Question {i}: tell me about item number {i}.", label="harmful" if i % 2 else "benign")
               for i in range(args.child)]
    plan = cmp.Plan(systems=systems, prompts=prompts, sampling=Sampling(max_tokens=args.tokens), out=None,
                    cache=folder / "cache", keywords=["I cannot"], threads=args.threads, ctx=512)
    aligned = next(s.name for s in systems if s.kind == "aligned")
    responses = {cmp.prompt_key(p): cmp.Result("", rng.integers(3, V, args.tokens).tolist(), 0.0, "length") for p in prompts}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    figures = cmp.teacher_forced(plan, {aligned: responses})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"prompts": args.child, "peak_kib": peak, "before_kib": before, "seconds": seconds,
                      "kl_base": figures["base"]["kl"]}))


def measure(size: int, args: argparse.Namespace, tree: Path | None) -> dict:
    env = dict(os.environ)
    if tree is not None:  # another checkout's sali first on the path
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, __file__, "--child", str(size), "--base", str(args.base), "--aligned", str(args.aligned),
               "--tokens", str(args.tokens), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tree or ROOT)
    if done.returncode != 0:
        sys.exit(f"child for {size} prompts failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_pair() -> tuple[Path, Path]:
    """The test suite's tiny base/aligned pair, built once (a few minutes of CPU) into bench/.cache."""
    base, aligned = CACHE / "base.f32.gguf", CACHE / "aligned.f32.gguf"
    if not (base.is_file() and aligned.is_file()):
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_pair import build_pair, convert_pair

        build_pair(CACHE)
        convert_pair(CACHE)
    return base, aligned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="Base GGUF (default: the tiny test pair's).")
    parser.add_argument("--aligned", type=Path, help="Aligned GGUF with the base's vocabulary (default: the tiny pair's).")
    parser.add_argument("--sizes", type=int, nargs=2, default=(100, 1000), help="The two prompt counts compared.")
    parser.add_argument("--tokens", type=int, default=32, help="Response tokens per prompt.")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 10 and 40 prompts of 8 tokens.")
    parser.add_argument("--against", type=Path, help="Also measure the sali of this other checkout (e.g. an older commit).")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.base is None or args.aligned is None:
        args.base, args.aligned = tiny_pair()
    args.base, args.aligned = args.base.resolve(), args.aligned.resolve()
    if args.child is not None:
        child(args)
        return
    if args.quick:
        args.sizes, args.tokens = (10, 40), 8
    trees = [("this tree", None)] + ([(f"{args.against}", args.against.resolve())] if args.against else [])
    for name, tree in trees:
        small, large = (measure(size, args, tree) for size in args.sizes)
        print(f"{name}: teacher-forced stage, {args.tokens} tokens per prompt, models {args.base.name} / {args.aligned.name}")
        for row in (small, large):
            print(f"  {row['prompts']:>5} prompts: peak RSS {row['peak_kib'] / 1024:7.1f} MiB "
                  f"(before the stage {row['before_kib'] / 1024:6.1f} MiB), {row['seconds']:.1f} s")
        print(f"  peak memory ratio {args.sizes[1]} / {args.sizes[0]} prompts: {large['peak_kib'] / small['peak_kib']:.3f}")


if __name__ == "__main__":
    main()

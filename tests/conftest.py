"""Shared fixtures: tiny real models (HF folder + GGUFs made by `sali convert`), heads, CLI runner.

The models are built once and cached under pytest's cache folder, keyed by the source of
the code that builds them, so a second run of the suite reuses them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# llama.cpp must never run multi-threaded twice at once on 2 cores; the tests use 1 thread.
THREADS = "1"


def _cache_folder(request, name: str) -> Path:
    """A folder that survives between runs (pytest's cache), or a temporary one without it."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir(name))
    return request.getfixturevalue("tmp_path_factory").mktemp(name)


def _source_key() -> str:
    digest = hashlib.sha256()
    for path in sorted([ROOT / "tests" / "tiny_models.py", *(ROOT / "convert").glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class TinyModels:
    hf_dir: Path
    f32: Path
    f16: Path
    q8_0: Path

    def gguf(self, outtype: str) -> Path:
        return getattr(self, outtype)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file, split at newlines only (see :func:`sali.prompts.jsonl_lines`:
    a response of a tiny random model may hold U+2028, at which str.splitlines also cuts)."""
    import json

    from sali.prompts import jsonl_lines

    return [json.loads(line) for line in jsonl_lines(Path(path).read_text(encoding="utf-8")) if line.strip()]


def run_sali(*args: str, input: str | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `sali` command in a subprocess (as a user would) and capture its output. The
    timeout only catches a hang: a loaded machine makes a seconds-long command take minutes."""
    full_env = dict(os.environ, COLUMNS="120", NO_COLOR="1", **(env or {}))
    full_env.pop("SALI_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "sali", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def tiny(request) -> TinyModels:
    """A random tiny Llama checkpoint with a byte-level BPE tokenizer, converted to f32/f16/q8_0."""
    from tiny_models import build_llama

    folder = _cache_folder(request, f"sali-tiny-{_source_key()}")
    hf_dir = folder / "hf"
    ggufs = {t: folder / f"tiny-{t}.gguf" for t in ("f32", "f16", "q8_0")}
    if not (hf_dir / "config.json").is_file():
        build_llama(hf_dir, seed=0)
    for outtype, path in ggufs.items():
        if not path.is_file():
            done = run_sali("convert", str(hf_dir), "-o", str(path), "--outtype", outtype)
            assert done.returncode == 0, done.stderr
    return TinyModels(hf_dir=hf_dir, **ggufs)


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """The f32 tiny GGUF loaded once in llama.cpp (1 thread, seed 0)."""
    from sali.runtime import Model

    model = Model(tiny.f32, n_threads=int(THREADS), n_ctx=512, seed=0)
    yield model
    model.close()


def make_head(model, *, k: int = 16, rank: int = 4, seed: int = 0, scale: float = 0.5, bias=None, promote=(), **meta):
    """A head with random (seeded) weights for `model`'s vocabulary."""
    from sali.head import Head

    rng = np.random.default_rng(seed)
    V = model.n_vocab
    b = np.zeros(V, dtype=np.float32) if bias is None else np.asarray(bias, dtype=np.float32)
    return Head.create(
        rng.standard_normal((V, rank)).astype(np.float32) * scale,
        rng.standard_normal((V, rank)).astype(np.float32) * scale,
        b,
        promote,
        k=k,
        vocab_fingerprint=model.fingerprint,
        base_model=model.name,
        **meta,
    )


def forcing_and_steering_heads(model, folder: Path) -> tuple[Path, Path]:
    """Two head files for `model`: force77.npz (always token 77, never an end token) and
    steer.npz (random weights that change what the model says)."""
    bias = np.zeros(model.n_vocab, dtype=np.float32)
    bias[77] = 1000.0
    make_head(model, scale=0.0, bias=bias, promote=[77]).save(folder / "force77.npz")
    make_head(model, k=8, rank=4, scale=1.0, promote=[5, 9, 40]).save(folder / "steer.npz")
    return folder / "force77.npz", folder / "steer.npz"


@dataclass
class Pair:
    """The tiny base/aligned pair of tests/tiny_pair.py (HF folders, GGUFs, prompt files)."""

    folder: Path
    groups: dict
    base_gguf: Path
    aligned_gguf: Path

    @property
    def base(self) -> Path:
        return self.folder / "base"

    @property
    def aligned(self) -> Path:
        return self.folder / "aligned"

    @property
    def train_prompts(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def heldout_prompts(self) -> Path:
        return self.folder / "heldout.jsonl"


@pytest.fixture(scope="session")
def pair(request) -> Pair:
    """Built once per source version and cached under pytest's cache folder."""
    import json

    from tiny_pair import build_pair, convert_pair

    digest = hashlib.sha256((ROOT / "tests" / "tiny_pair.py").read_bytes() + _source_key().encode()).hexdigest()[:12]
    folder = _cache_folder(request, f"sali-pair-{digest}")
    done = folder / "groups.json"
    if not done.is_file():
        groups = build_pair(folder)
        convert_pair(folder)
        done.write_text(json.dumps(groups))
    groups = json.loads(done.read_text())
    return Pair(folder, groups, folder / "base.f32.gguf", folder / "aligned.f32.gguf")


def starts_refusal(text: str) -> bool:
    return text.strip().startswith("I cannot")


TRAIN_ARGS = ["--max-new-tokens", "12", "--k", "32", "--rank", "16", "--epochs", "40", "--extract-batch", "16",
              "--threads", "1", "--lr", "1e-2"]


def train(pair, out: Path, cache: Path, *extra: str):
    """Run the real `sali train` on the tiny pair."""
    done = run_sali(
        "train", "--base", str(pair.base), "--aligned", str(pair.aligned), "-P", str(pair.train_prompts),
        "-o", str(out), "--cache", str(cache), *TRAIN_ARGS, *extra, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="session")
def trained(pair, tmp_path_factory):
    """A top-k head trained on the tiny pair (shared with the compare tests)."""
    folder = tmp_path_factory.mktemp("trained")
    head = folder / "topk.npz"
    done = train(pair, head, folder / "cache")
    return head, folder / "cache", done




def interruptible() -> None:
    """preexec_fn for a child that must see Ctrl-C: a shell runs background jobs with SIGINT
    ignored, and a Python started that way keeps ignoring it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_error_line(done) -> str:
    """The command failed with exactly one line on stderr, an `error:` line, and no traceback."""
    assert done.returncode != 0, done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and lines[0].startswith("error: ")
    return lines[0]

"""Fuzz sali's inputs: every damaged file or odd line must work or give sali's one-line error.

    python bench/fuzz.py --examples 20000 [--seed 0] [--kinds head,prompt,gguf,chat,http]

Kinds (the share of --examples each gets):

* ``head`` (44%): a valid head file (both kinds: top-k and white-box), then truncated, bit-flipped,
  a member dropped or replaced by a random array, metadata values replaced by junk of the wrong
  type, a compressed member's bytes corrupted. Loaded in-process (:func:`sali.head.load_any`), an
  accepted head is applied to logits and shown by ``sali head info``.
* ``prompt`` (44%): .txt / .jsonl / .csv prompt files with wrong types, missing fields, BOMs, NUL
  bytes, huge lines, invalid UTF-8, random byte damage. Read in-process
  (:func:`sali.prompts.read_prompts`); every accepted prompt is tokenized by llama.cpp and written
  as a JSON record, as ``sali generate --out`` does.
* ``gguf`` (10%): the tiny canary GGUF truncated at random offsets, bit-flipped in its header,
  metadata and tensor-info table (and now and then anywhere). Checked in-process
  (:func:`sali.ggufcheck.check_gguf`); a file the check lets through is loaded by llama.cpp and
  generates 2 tokens in a worker subprocess, so a crash is seen as a signal.
* ``http`` (5% more): request bodies for a real ``sali serve`` on the tiny model (loopback only):
  valid chat and completion bodies with fields dropped, replaced by junk of the wrong type or
  out of range, unknown fields added, truncated or byte-damaged JSON, random bytes. A 2xx answer
  counts as accepted, a 4xx with an OpenAI-style JSON error as refused, a 5xx or a non-JSON
  error as other exception, a dead server as crash, no answer within 60 s as hang.
* ``chat`` (2%): random lines (slash commands with junk arguments, user turns) fed to ``sali chat``
  with stdin piped, 20 lines a session, each session a subprocess with a time limit; every line of
  a session counts with the session's outcome.

Outcomes: accepted (worked), refused (sali's error: SaliError in-process, or exit 1 with one
``error:`` line), other exception (any other exception type, or exit 2: sali's "unexpected"
line), crash (killed by a signal), hang (over the time limit). The table counts them per kind;
up to 3 examples of every other exception, crash and hang are printed below it.

``--examples 40`` is the test suite's smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sali.errors import SaliError  # noqa: E402

OUTCOMES = ("accepted", "refused", "other exception", "crash", "hang")
SHARES = {"head": 0.44, "prompt": 0.44, "gguf": 0.10, "chat": 0.02, "http": 0.05}
CHAT_LINES = 20
IN_PROCESS_LIMIT = 10  # seconds per in-process input before it counts as a hang
JUNK = [None, True, False, 0, -1, 1.5, float("nan"), 10**30, "", "x", "[/x]", [], [1, 2], {}, {"type": 3}, "\u0000", "😀" * 3]


@dataclass
class Tally:
    """Outcome counts of one kind, plus a few examples of each bad outcome."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, outcome: str, detail: str = "", inputs: int = 1) -> None:
        self.counts[outcome] += inputs
        if outcome not in ("accepted", "refused") and len(self.examples[outcome]) < 3:
            self.examples[outcome].append(detail[:300])


# ---- byte mutations (shared by every file kind) -------------------------------------------------
def flip_bits(data: bytes, rng: random.Random, low: int = 0, high: int | None = None, flips: int | None = None) -> bytes:
    """Flip 1-8 random bits between byte offsets `low` and `high`."""
    out = bytearray(data)
    high = len(out) if high is None else min(high, len(out))
    if high <= low:
        return bytes(out)
    for _ in range(flips or rng.randint(1, 8)):
        out[rng.randrange(low, high)] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


# ---- heads --------------------------------------------------------------------------------------
def _head_files(folder: Path) -> list[bytes]:
    """A small valid top-k head and a white-box head, as bytes."""
    from sali.head import FORMAT_NAME, FORMAT_VERSION, Head, LMHead

    rng = np.random.default_rng(0)
    V, r = 48, 3
    topk = Head.create(rng.standard_normal((V, r)), rng.standard_normal((V, r)), rng.standard_normal(V), [1, 5, 7],
                       k=8, vocab_fingerprint="v48-fuzz", base_format={"type": "template", "template": "Q: {prompt}\nA:"},
                       training={"epochs": 3})
    lm = LMHead(P=rng.standard_normal((V, r)).astype(np.float32), Q=rng.standard_normal((16, r)).astype(np.float32),
                meta={"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": "lmhead", "rank": r, "vocab_size": V,
                      "hidden_size": 16, "vocab_fingerprint": "v48-fuzz"})
    paths = [topk.save(folder / "topk.npz"), lm.save(folder / "lm.npz")]
    return [p.read_bytes() for p in paths]


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip(members: dict[str, bytes], compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _random_array(rng: random.Random) -> np.ndarray:
    dtype = rng.choice(["float32", "float16", "float64", "int32", "int64", "uint8", "bool", "complex64", "<U4"])
    shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
    values = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(shape) * 10 ** rng.randint(-2, 40)
    with np.errstate(all="ignore"):
        return values.astype(dtype) if dtype != "<U4" else values.astype(str).astype(dtype)


def _junk_meta(meta: dict, rng: random.Random) -> dict:
    meta = dict(meta)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(meta) + ["base_format", "features", "training"])
        action = rng.random()
        if action < 0.15:
            meta.pop(key, None)
        else:
            meta[key] = rng.choice(JUNK + [str(rng.randint(-5, 99)), rng.randint(-5, 99), [meta.get(key)]])
    return meta


def mutate_head(originals: list[bytes], rng: random.Random) -> bytes:
    """One damaged head file (see module docstring)."""
    data = rng.choice(originals)
    action = rng.randrange(7)
    if action == 0:
        return truncate(data, rng)
    if action == 1:
        return flip_bits(data, rng)
    members = _members(data)
    name = rng.choice(sorted(members))
    if action == 2:
        members.pop(name)
    elif action == 3:
        members[name] = _npy(_random_array(rng))
    elif action == 4:
        meta = json.loads(np.lib.format.read_array(io.BytesIO(members["meta.npy"])).tobytes())
        text = json.dumps(_junk_meta(meta, rng), allow_nan=True)
        members["meta.npy"] = _npy(np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8))
    elif action == 5:  # damage the .npy header or body inside an intact archive
        members[name] = flip_bits(members[name], rng, 0, rng.choice([128, len(members[name])]))
    else:  # corrupt a compressed member's deflate stream, CRCs left as they were
        blob = _zip(members)
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            info = rng.choice(archive.infolist())
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        return flip_bits(blob, rng, start, start + max(1, info.compress_size))
    return _zip(members, compress=rng.random() < 0.8)


def check_head(path: Path) -> None:
    """What sali does with a head file: load it, apply it, show `sali head info`."""
    from sali.cli import head_info
    from sali.head import Head, load_any
    from sali.prompts import describe_format, render

    head = load_any(path)
    describe_format(head.base_format)
    if head.base_format.get("type") != "chat":
        render(head.base_format, [{"role": "user", "content": "hi"}], chat_template=None)
    if isinstance(head, Head):
        logits = np.random.default_rng(0).standard_normal(head.vocab_size).astype(np.float32)
        head.apply_dense(logits, 1.0)
    with contextlib.redirect_stdout(io.StringIO()):
        head_info(str(path))


# ---- prompt files -------------------------------------------------------------------------------
def _json_value(rng: random.Random):
    return rng.choice(JUNK + ["How do I bake bread?", "  ", "\ud800", "a\x00b", "x" * rng.choice([10, 70000])])


def make_prompt_file(rng: random.Random) -> tuple[str, bytes]:
    """``(suffix, bytes)`` of a prompt file, valid or damaged (see module docstring)."""
    suffix = rng.choice([".txt", ".jsonl", ".csv"])
    rows = []
    for _ in range(rng.randint(0, 5)):
        if suffix == ".jsonl":
            row = {"prompt": "How do I bake bread?", "label": "benign", "answer": "#### 4"}
            for key in rng.sample(["prompt", "label", "answer", "extra"], rng.randint(0, 2)):
                if rng.random() < 0.3:
                    row.pop(key, None)
                else:
                    row[key] = _json_value(rng)
            if rng.random() < 0.1:
                row = rng.choice([[row], "prompt", 3, None])
            text = json.dumps(row, ensure_ascii=rng.random() < 0.5, allow_nan=True) if rng.random() > 0.05 else "{not json"
            rows.append(text if rng.random() > 0.03 else "[" * 100000)
        elif suffix == ".csv":
            rows.append(rng.choice(['How do I bake bread?,benign', '"quoted, with comma",harmful', '"unclosed,benign',
                                    "x" * rng.choice([10, 200000]) + ",benign", ",", "a,b,c,d", ""]))
        else:
            rows.append(rng.choice(["How do I bake bread?", "   ", "x" * rng.choice([10, 300000]), "tab\there", "\u2028split"]))
    if suffix == ".csv":
        rows.insert(0, rng.choice(["prompt,label", "goal,label", "Question,answer", "text,label", "prompt,prompt", ""]))
    data = "\n".join(rows).encode("utf-8", "surrogatepass")
    action = rng.randrange(8)
    if action == 0:
        data = b"\xef\xbb\xbf" + data
    elif action == 1 and data:
        spot = rng.randrange(len(data) + 1)
        data = data[:spot] + rng.choice([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\r", b"\r\n"]) + data[spot:]
    elif action == 2:
        data = flip_bits(data, rng)
    elif action == 3:
        data = truncate(data, rng)
    return suffix, data


class PromptChecker:
    """Read a prompt file as every command does, then tokenize and serialise each prompt."""

    def __init__(self, model_path: Path):
        from sali.runtime import Model

        self.model = Model(model_path, n_threads=1, n_ctx=64)

    def __call__(self, path: Path) -> None:
        from sali.prompts import read_prompts

        for prompt in read_prompts(path):
            self.model.tokenize(prompt.text)
            json.dumps({"prompt": prompt.text, "label": prompt.label, "answer": prompt.answer}, ensure_ascii=False).encode("utf-8")


# ---- GGUF files ---------------------------------------------------------------------------------
def gguf_regions(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the header (24 bytes), the metadata and the tensor-info table."""
    import gguf

    reader = gguf.GGUFReader(path)
    infos = min(t.field.offset for t in reader.tensors)
    return [(0, 24), (24, infos), (infos, reader.data_offset)]


def mutate_gguf(data: bytes, regions: list[tuple[int, int]], rng: random.Random) -> bytes:
    action = rng.random()
    if action < 0.3:
        header_end = regions[-1][1]
        return data[: rng.randrange(header_end + 64)] if rng.random() < 0.6 else truncate(data, rng)
    if action < 0.95:
        low, high = rng.choice(regions)
        return flip_bits(data, rng, low, high, flips=rng.choice([1, 1, 2, 4]))
    return flip_bits(data, rng)


WORKER = r"""
import sys
from sali.errors import SaliError
from sali.runtime import Model, Sampling
for line in sys.stdin:
    try:
        model = Model(line.strip(), n_threads=1, n_ctx=64, verbose=False)
        model.complete(model.tokenize("hello there") or [0], Sampling(max_tokens=2))
        model.close()
        print("accepted", flush=True)
    except SaliError as exc:
        print("refused", flush=True)
    except Exception as exc:
        print("other exception", type(exc).__name__, str(exc)[:200].replace("\n", " "), flush=True)
"""


class GGUFWorker:
    """A subprocess that loads GGUFs in llama.cpp one after another; restarted after a crash."""

    def __init__(self, limit: float = 60.0):
        self.limit = limit
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile("w+")  # the worker's stderr: llama.cpp's last words

    def _start(self) -> None:
        self.log.seek(0)
        self.log.truncate()
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=Path(__file__).resolve().parent.parent)

    def load(self, path: Path) -> tuple[str, str]:
        import selectors

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        if not selector.select(self.limit):
            self.close()
            return "hang", f"llama.cpp load of a damaged GGUF took over {self.limit} s"
        line = self.proc.stdout.readline().strip()
        if not line:
            code = self.proc.wait()
            self.proc = None
            self.log.seek(0)
            last = [line for line in self.log.read().splitlines() if line.strip()][-1:]
            what = f"signal {signal.Signals(-code).name}" if code < 0 else f"worker exit {code}"
            return ("crash" if code < 0 else "other exception"), f"{what}: {last[0] if last else ''} ({path.stat().st_size} bytes)"
        outcome, _, detail = line.partition(" ")
        return (outcome, detail) if outcome in ("accepted", "refused") else ("other exception", line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ---- chat -----------------------------------------------------------------------------------------
def chat_script(rng: random.Random) -> str:
    lines = []
    for _ in range(CHAT_LINES):
        command = rng.choice(["/alpha", "/head", "/system", "/save", "/reset", "/help", "/unknown", "/", "//", "/exit "])
        argument = rng.choice(["", " ", "on", "off", "nan", "inf", "-inf", "1e309", "-3", "0", "2.5", "x",
                               "[/x]", "😀", "\t", "%s", "a\x00b", "transcript.json", "sub/dir.json", ".", "..", "out[/x].json"])
        lines.append(rng.choice([f"{command} {argument}", f"{command}{argument}", "hello " + argument, argument]))
    if rng.random() < 0.8:  # most sessions run every line; the rest end at an /exit
        lines = [line for line in lines if not line.strip().startswith("/exit")]
    return "\n".join(line.replace("\n", " ") for line in lines) + "\n"


def run_chat(model: Path, head: Path, script: str, folder: Path, limit: float = 120.0) -> tuple[str, str]:
    env = dict(os.environ, NO_COLOR="1", COLUMNS="100")
    env.pop("SALI_DEBUG", None)
    command = [sys.executable, "-m", "sali", "chat", str(model), "--head", str(head), "--format", "plain",
               "--max-tokens", "2", "--threads", "1", "--ctx", "256"]
    try:
        done = subprocess.run(command, input=script.encode("utf-8", "surrogatepass"), capture_output=True, timeout=limit,
                              cwd=folder, env=env)
    except subprocess.TimeoutExpired:
        return "hang", f"sali chat over {limit} s on {script!r}"[:300]
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode == 0:
        return "accepted", ""
    if done.returncode < 0:
        return "crash", f"signal {signal.Signals(-done.returncode).name} on {script!r}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    if done.returncode == 1 and lines and lines[-1].startswith("error: ") and "Traceback" not in stderr:
        return "refused", lines[-1]
    return "other exception", f"exit {done.returncode}: {lines[-1] if lines else ''} on {script!r}"


# ---- HTTP request bodies for sali serve ------------------------------------------------------------
HTTP_BODIES = {
    "/v1/chat/completions": {"model": "tiny+head", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["x"], "stream": False, "alpha": 1.0},
    "/v1/completions": {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0, "min_p": 0.1,
                        "repeat_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.5, "stream": False},
}
HTTP_JUNK = JUNK + [-5, 10**9, 2**63, "tiny", "tiny+head", "../head.npz", "/etc/passwd", [{"role": "user"}],
                    [{"role": "robot", "content": "x"}], [{"role": "user", "content": ["x"]}], {"a": [1, {"b": None}]}]


def http_request(rng: random.Random) -> tuple[str, bytes]:
    """(path, body): a valid body damaged in one or more ways."""
    path = rng.choice(list(HTTP_BODIES))
    body = json.loads(json.dumps(HTTP_BODIES[path]))
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        keys = list(body) or ["model"]
        if action < 0.25:
            body.pop(rng.choice(keys), None)
        elif action < 0.6:
            body[rng.choice(keys)] = rng.choice(HTTP_JUNK)
        elif action < 0.7:
            body[rng.choice(["extra", "n", "logprobs", "tools", "user", "\u0000"])] = rng.choice(HTTP_JUNK)
        elif action < 0.8 and isinstance(body.get("messages"), list):
            body["messages"] = [rng.choice(HTTP_JUNK) for _ in range(rng.randint(0, 3))]
        else:
            body["stream"] = rng.random() < 0.5
    data = json.dumps(body, allow_nan=True).encode()
    roll = rng.random()
    if roll < 0.08:
        data = truncate(data, rng)
    elif roll < 0.14:
        data = flip_bits(data, rng)
    elif roll < 0.17:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
    return path, data


class HttpTarget:
    """A real `sali serve` on the tiny model and a head, on a free loopback port."""

    def __init__(self, model: Path, head: Path, folder: Path, startup: float = 120.0):
        import socket

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(timeout=60.0)
        self.log = open(folder / "serve.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "sali", "serve", str(model), "-H", str(head), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--ctx", "256", "-t", "1", "--format", "plain"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.client.get(f"{self.base}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError(f"sali serve did not start; see {folder / 'serve.log'}")

    def send(self, path: str, data: bytes) -> tuple[str, str]:
        import httpx

        what = f"POST {path} {data[:160]!r}"
        try:
            response = self.client.post(self.base + path, content=data, headers={"Content-Type": "application/json"})
            _ = response.content  # a stream is read to its end
        except httpx.TimeoutException:
            return "hang", what
        except httpx.TransportError as exc:
            if self.proc.poll() is not None:
                return "crash", f"server exited {self.proc.returncode}: {what}"
            return "other exception", f"{type(exc).__name__}: {what}"
        if response.status_code < 400:
            return "accepted", ""
        try:
            ok = 400 <= response.status_code < 500 and "message" in response.json()["error"]
        except (ValueError, KeyError, TypeError):
            ok = False
        return ("refused", "") if ok else ("other exception", f"{response.status_code} {response.text[:120]!r}: {what}")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---- the run ----------------------------------------------------------------------------------------
class _Hang(BaseException):
    pass


def in_process(check: Callable[[Path], None], path: Path) -> tuple[str, str]:
    """Classify one in-process check of `path`; SIGALRM stops a hang."""

    def alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(IN_PROCESS_LIMIT)
    try:
        check(path)
        return "accepted", ""
    except SaliError:
        return "refused", ""
    except _Hang:
        return "hang", f"over {IN_PROCESS_LIMIT} s"
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer counts
        return "other exception", f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(examples: int, seed: int, kinds: list[str], folder: Path, report=print, keep: Path | None = None) -> dict[str, Tally]:
    """Run `examples` inputs split over `kinds` (see :data:`SHARES`); returns a tally per kind.
    With `keep`, every file input with a bad outcome (other exception, crash, hang) is copied there."""

    def kept(outcome: str, detail: str, path: Path) -> tuple[str, str]:
        if keep is not None and outcome not in ("accepted", "refused"):
            keep.mkdir(parents=True, exist_ok=True)
            copy = keep / f"{outcome.replace(' ', '-')}-{len(list(keep.iterdir())):04d}{path.suffix}"
            copy.write_bytes(path.read_bytes())
            detail = f"{detail} [kept as {copy}]"
        return outcome, detail

    from sali.canary import write_tiny_gguf
    from sali.ggufcheck import check_gguf
    from sali.runtime import Model

    rng = random.Random(seed)
    total = sum(SHARES[k] for k in kinds)
    quota = {k: max(1, round(examples * SHARES[k] / total)) for k in kinds}
    quota[max(kinds, key=lambda k: SHARES[k])] += max(0, examples - sum(quota.values()))  # rounding: exactly --examples
    model_path = write_tiny_gguf(folder / "tiny.gguf")
    tallies = {k: Tally() for k in kinds}
    target = folder / "input"
    if "head" in kinds:
        originals = _head_files(folder)
        for _ in range(quota["head"]):
            target.with_suffix(".npz").write_bytes(mutate_head(originals, rng))
            tallies["head"].add(*kept(*in_process(check_head, target.with_suffix(".npz")), target.with_suffix(".npz")))
    if "prompt" in kinds:
        checker = PromptChecker(model_path)
        for _ in range(quota["prompt"]):
            suffix, data = make_prompt_file(rng)
            target.with_suffix(suffix).write_bytes(data)
            tallies["prompt"].add(*kept(*in_process(checker, target.with_suffix(suffix)), target.with_suffix(suffix)))
        checker.model.close()
    if "gguf" in kinds:
        original = model_path.read_bytes()
        regions = gguf_regions(model_path)
        worker = GGUFWorker()
        try:
            for _ in range(quota["gguf"]):
                path = target.with_suffix(".gguf")
                path.write_bytes(mutate_gguf(original, regions, rng))
                outcome, detail = in_process(check_gguf, path)
                if outcome == "accepted":  # the check let it through: llama.cpp must cope
                    outcome, detail = worker.load(path)
                tallies["gguf"].add(*kept(outcome, detail, path))
        finally:
            worker.close()
    if "chat" in kinds or "http" in kinds:
        from sali.head import Head

        model = Model(model_path, n_threads=1, n_ctx=64)
        V = model.n_vocab
        weights = np.random.default_rng(1)
        head = Head.create(weights.standard_normal((V, 4)), weights.standard_normal((V, 4)), np.zeros(V), [3, 9], k=16,
                           vocab_fingerprint=model.fingerprint).save(folder / "head.npz")
        model.close()
    if "http" in kinds:
        server = HttpTarget(model_path, head, folder)
        try:
            for _ in range(quota["http"]):
                tallies["http"].add(*server.send(*http_request(rng)))
            if server.proc.poll() is not None:
                tallies["http"].add("crash", f"server exited {server.proc.returncode} by the end", inputs=0)
        finally:
            server.close()
    if "chat" in kinds:
        work = folder / "chat"
        work.mkdir(exist_ok=True)
        for _ in range(max(1, -(-quota["chat"] // CHAT_LINES))):  # whole sessions, rounded up
            tallies["chat"].add(*run_chat(model_path, head, chat_script(rng), work), inputs=CHAT_LINES)
    return tallies


def table(tallies: dict[str, Tally]) -> str:
    header = ["kind", "inputs", *OUTCOMES]
    rows = [[kind, str(sum(t.counts.values())), *(str(t.counts[o]) for o in OUTCOMES)] for kind, t in tallies.items()]
    rows.append(["all", *(str(sum(int(r[i]) for r in rows)) for i in range(1, len(header)))])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    notes = [f"{kind} {outcome}: {example}" for kind, t in tallies.items() for outcome, found in t.examples.items() for example in found]
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="inputs in all, split over the kinds")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--keep", type=Path, help="copy every file input with a bad outcome into this folder")
    parser.add_argument("--kinds", default="head,prompt,gguf,chat,http", help="comma-separated subset of head,prompt,gguf,chat,http")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(SHARES)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sali-fuzz-") as folder:
        tallies = fuzz(args.examples, args.seed, kinds, Path(folder), keep=args.keep)
    print(table(tallies))
    print(f"\n{time.perf_counter() - start:.0f} s · seed {args.seed} · chat: sessions of {CHAT_LINES} lines, each line counted")
    bad = sum(t.counts[o] for t in tallies.values() for o in ("other exception", "crash", "hang"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

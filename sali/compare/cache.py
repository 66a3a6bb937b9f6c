"""The response cache of `sali compare`: one append-only JSONL file per system, named by the
system's key (model, heads, format, sampling, prefill), one line per finished prompt. An interrupted
comparison resumes, and adding a head reuses every other system's responses."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sali.compare.systems import System
from sali.prompts import jsonl_lines
from sali.runtime import Sampling


@dataclass
class Result:
    """A system's response to one prompt."""

    response: str
    tokens: list[int]
    seconds: float
    finish_reason: str


class Cache:
    """Append-only JSONL per system: one line per finished prompt. A line cut short by an
    interruption is ignored when read back."""

    def __init__(self, folder: Path, system: System, sampling: Sampling, prefill: str | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{system.key(sampling, prefill)}.jsonl"
        self.entries: dict[str, Result] = {}
        if self.path.is_file():
            for line in jsonl_lines(self.path.read_text(encoding="utf-8")):
                try:
                    row = json.loads(line)
                    self.entries[row["prompt"]] = Result(row["response"], row["tokens"], row["seconds"], row["finish_reason"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def add(self, key: str, result: Result) -> None:
        self.entries[key] = result
        row = {"prompt": key, "response": result.response, "tokens": result.tokens, "seconds": result.seconds, "finish_reason": result.finish_reason}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

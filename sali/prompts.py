"""Prompt files and prompt formats.

Prompt files (one reader for every command):

* ``.txt``: one prompt a line (blank lines skipped);
* ``.jsonl``: one JSON object a line with a ``prompt`` field; ``label`` and ``answer`` optional;
* ``.csv``: a ``prompt``, ``goal`` or ``Question`` column; ``label`` and ``answer`` columns optional.

Prompt formats say how a conversation becomes the text a model reads:

* ``{"type": "plain"}``: the raw user text (earlier turns joined with blank lines);
* ``{"type": "chat"}``: the model's own chat template (from the GGUF or tokenizer);
* ``{"type": "template", "template": "...{prompt}..."}``: a string with ``{prompt}``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sali.errors import SaliError

PROMPT_COLUMNS = ("prompt", "goal", "Question")


@dataclass
class Prompt:
    """One prompt read from a file."""

    text: str
    label: str | None = None
    answer: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file (see module docstring). Raises :class:`SaliError` on bad input."""
    path = Path(path)
    if not path.is_file():
        raise SaliError(f"prompt file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SaliError(f"{path}: not UTF-8 text (bad byte at line {line}); save it as UTF-8") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise SaliError(f"{path}: holds a NUL byte at line {line}; a prompt file is plain text")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _read_jsonl(text, path)
    elif suffix == ".csv":
        prompts = _read_csv(text, path)
    else:
        prompts = [Prompt(line.strip(), source=f"{path.name}:{i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise SaliError(f"{path}: no prompts in the file")
    for prompt in prompts:
        _check_text(prompt, path)
    return prompts


def _check_text(prompt: Prompt, path: Path) -> None:
    """JSON escapes can smuggle in what UTF-8 text cannot hold: lone surrogates (``\\ud800``)
    and NUL characters, which no tokenizer or output file accepts."""
    for name in ("text", "label", "answer"):
        value = getattr(prompt, name)
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SaliError(f"{prompt.source or path}: the {name} holds an unpaired UTF-16 surrogate (not valid Unicode text)") from None
        if "\x00" in value:
            raise SaliError(f"{prompt.source or path}: the {name} holds a NUL character")


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL `text`, split at newlines only. ``str.splitlines`` also splits at
    U+2028, U+0085, form feeds and other separators that a JSON string may hold as they are
    (``json.dumps(..., ensure_ascii=False)`` writes them unescaped), cutting a record in two."""
    return text.split("\n")


def _read_jsonl(text: str, path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SaliError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise SaliError(f"{path}:{number}: JSON nested too deeply") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SaliError(f"{path}:{number}: each line needs a string field \"prompt\"")
        if not row["prompt"].strip():
            raise SaliError(f"{path}:{number}: the prompt is empty")
        prompts.append(_prompt_from_row(row, row["prompt"], f"{path.name}:{number}"))
    return prompts


def _read_csv(text: str, path: Path) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        column = next((c for c in PROMPT_COLUMNS if c in (reader.fieldnames or [])), None)
        if column is None:
            found = ", ".join(reader.fieldnames or [])[:200] or "none"
            raise SaliError(f"{path}: needs a column named {', '.join(PROMPT_COLUMNS)} (found: {found})")
        return [
            _prompt_from_row(row, row[column], f"{path.name}:{number}")
            for number, row in enumerate(reader, 2)
            if (row.get(column) or "").strip()
        ]
    except csv.Error as exc:  # e.g. a field longer than the csv module's limit (128 KiB)
        raise SaliError(f"{path}:{reader.line_num}: unreadable CSV ({exc})") from None


def _prompt_from_row(row: dict[str, Any], text: str, source: str) -> Prompt:
    label = row.get("label")
    answer = row.get("answer")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "label", "answer")}
    return Prompt(
        text=text.strip(),
        label=str(label) if label not in (None, "") else None,
        answer=str(answer) if answer not in (None, "") else None,
        source=source,
        extra=extra,
    )


# ---- formats --------------------------------------------------------------------------------
def parse_format(spec: str) -> dict[str, Any]:
    """``plain`` | ``chat`` | a template string containing ``{prompt}`` -> a format dict."""
    if spec in ("plain", "chat"):
        return {"type": spec}
    if "{prompt}" not in spec:
        raise SaliError(f"prompt format {spec!r} must be 'plain', 'chat' or a template containing {{prompt}}")
    return {"type": "template", "template": spec.replace("\\n", "\n")}


def describe_format(fmt: dict[str, Any]) -> str:
    if fmt.get("type") == "template":
        return f"template {fmt['template']!r}"
    return str(fmt.get("type", "chat"))


def render(
    fmt: dict[str, Any],
    messages: list[dict[str, str]],
    *,
    chat_template: str | None,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Turn ``messages`` (role/content dicts ending with a user turn) into prompt text.

    For ``chat`` the Jinja chat template is rendered with the generation prompt added.
    For ``plain`` and ``template`` a system message is put in front as plain text.
    """
    kind = fmt.get("type", "chat")
    if kind == "chat":
        if not chat_template:
            raise SaliError("the model has no chat template; use the plain format or give a template with {prompt}")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(template=chat_template, eos_token=eos_token, bos_token=bos_token)
        try:
            return formatter(messages=messages).prompt
        except Exception as exc:  # noqa: BLE001 - jinja errors come in many types
            raise SaliError(f"the chat template failed to render: {exc}") from None
    template = fmt.get("template", "{prompt}") if kind == "template" else "{prompt}"
    parts: list[str] = []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"] + "\n\n")
        elif message["role"] == "user":
            parts.append(template.replace("{prompt}", message["content"]))
        else:
            parts.append(message["content"] + "\n\n")
    return "".join(parts)

"""What `generate` and `chat` share: a model, an optional head, a prompt format, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sali.errors import SaliError
from sali.head import Head
from sali.prompts import describe_format, parse_format, render
from sali.runtime import Model, Sampling


def resolve_model_path(model: Path | None) -> Path:
    if model is not None:
        return model
    from sali.demo import default_model_path

    return default_model_path()


def shipped_heads() -> dict[str, Path]:
    """Heads installed with sali (the ``heads/`` folder, package ``sali.heads``): name -> path."""
    import importlib.util

    spec = importlib.util.find_spec("sali.heads")
    folders = list(spec.submodule_search_locations or []) if spec else []
    return {path.stem: path for folder in folders for path in sorted(Path(folder).glob("*.npz"))}


def resolve_head_path(head: Path | str | None) -> Path | None:
    """A head file path, or the name of a shipped head (``--head smollm2-135m-safety``)."""
    if head is None:
        return None
    path = Path(head)
    if path.exists() or path.suffix == ".npz" or len(path.parts) > 1:
        return path
    shipped = shipped_heads()
    if str(head) in shipped:
        return shipped[str(head)]
    names = ", ".join(shipped) or "none installed"
    raise SaliError(f"no head file or shipped head named {head!r} (shipped heads: {names})")


@dataclass
class Session:
    """A loaded model with an optional head, a prompt format and sampling settings.

    ``messages`` holds the conversation as role/content dicts; ``render_prompt`` turns it into
    text in the chosen format.
    """

    model: Model
    head: Head | None
    fmt: dict[str, Any]
    sampling: Sampling
    alpha: float = 1.0
    head_on: bool = True
    head_path: Path | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        model_path: Path | None,
        head_path: Path | str | None,
        fmt_spec: str | None,
        sampling: Sampling,
        *,
        alpha: float = 1.0,
        n_gpu_layers: int = 0,
        threads: int | None = None,
        ctx: int = 2048,
    ) -> "Session":
        head_file = resolve_head_path(head_path)
        head = Head.load(head_file) if head_file is not None else None
        model = Model(resolve_model_path(model_path), n_gpu_layers=n_gpu_layers, n_threads=threads, n_ctx=ctx, seed=sampling.seed)
        if head is not None:
            model.check_head(head, head_name=str(head_file))
        fmt = choose_format(fmt_spec, head, model)
        stops = tuple(sampling.stop) + default_stops(fmt)
        sampling.stop = tuple(dict.fromkeys(s for s in stops if s))
        return cls(model=model, head=head, fmt=fmt, sampling=sampling, alpha=alpha, head_path=head_file)

    @property
    def active_head(self) -> Head | None:
        return self.head if self.head_on else None

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return render(
            self.fmt,
            full,
            chat_template=self.model.chat_template,
            bos_token=self.model.bos_text,
            eos_token=self.model.eos_text,
        )

    def stream(self, messages: list[dict[str, str]], result: dict | None = None) -> Iterator[str]:
        prompt = self.render_prompt(messages)
        return self.model.stream(prompt, self.sampling, self.active_head, self.alpha, result)

    def describe(self) -> str:
        head = "none"
        if self.head is not None:
            head = f"{self.head_path.name if self.head_path else 'head'} ({'on' if self.head_on else 'off'}, alpha {self.alpha:g})"
        return f"model {self.model.name} · head {head} · format {describe_format(self.fmt)}"


def choose_format(spec: str | None, head: Head | None, model: Model) -> dict[str, Any]:
    """--format if given, else the head's training format, else chat (plain without a template)."""
    if spec:
        fmt = parse_format(spec)
    elif head is not None:
        fmt = head.base_format
    else:
        fmt = {"type": "chat" if model.chat_template else "plain"}
    if fmt["type"] == "chat" and not model.chat_template:
        raise SaliError(f"{model.name} has no chat template; pass --format plain or a template with {{prompt}}")
    return fmt


def default_stops(fmt: dict[str, Any]) -> tuple[str, ...]:
    """A template's text before ``{prompt}`` marks the next user turn: stop there."""
    if fmt.get("type") == "template":
        prefix = fmt["template"].split("{prompt}", 1)[0].strip()
        return (prefix,) if prefix else ()
    return ()

"""What `generate` and `chat` share: a model, an optional head, a prompt format, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sali.api import Sali, load
from sali.errors import SaliError
from sali.head import Head
from sali.runtime import Sampling, Stream


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
    """A loaded model with an optional head, sampling settings and a conversation.

    ``messages`` holds the conversation as role/content dicts (without the system message,
    kept in ``system``). With the head off the prompt format stays the head's and alpha is 0,
    which reproduces the plain base exactly. ``alpha`` None: the head's calibrated strength for
    this model, else 1 (:meth:`sali.api.Sali.effective_alpha`).
    """

    engine: Sali
    sampling: Sampling
    alpha: float | None = None
    head_on: bool = True
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    prefill: str | None = None  # every reply begins with this text (generate --prefill)
    explain: bool = False  # fill each completion's `explained` (generate --explain, chat /explain on)

    @classmethod
    def open(
        cls,
        model_path: Path | None,
        head_path: Path | str | list[str] | None,
        fmt_spec: str | None,
        sampling: Sampling,
        *,
        alpha: float | None = None,
        calibration: bool = True,
        n_gpu_layers: int = 0,
        threads: int | None = None,
        ctx: int = 2048,
    ) -> "Session":
        """`head_path`: a head, or a list of --head values: all of them applied, in combination
        (each may be ``NAME@STRENGTH`` or ``A+B``; see :mod:`sali.combine`)."""
        if isinstance(head_path, list):
            from sali.combine import parse_spec

            parts = [part for spec in head_path for part in parse_spec(spec)]
            head_path = [parts] if parts else None
        engine = load(model_path, head_path, fmt=fmt_spec, alpha=alpha, calibration=calibration,
                      n_gpu_layers=n_gpu_layers, n_threads=threads, n_ctx=ctx, seed=sampling.seed)
        return cls(engine=engine, sampling=sampling, alpha=alpha)

    @property
    def model(self):
        return self.engine.model

    @property
    def head(self) -> Head | None:
        chosen = self.engine.head()
        return chosen.head if chosen else None

    @property
    def head_path(self) -> Path | None:
        chosen = self.engine.head()
        return chosen.path if chosen else None

    @property
    def head_spec(self) -> str | None:
        """The head(s) as `--head` takes them: a file, or ``file@s+file@s`` for a combination."""
        chosen = self.engine.choose()
        return chosen.describe() if chosen else None

    @property
    def effective_alpha(self) -> float | None:
        """The strength the head runs at (None without a head)."""
        return self.engine.effective_alpha(alpha=self.alpha)

    @property
    def fmt(self) -> dict[str, Any]:
        return self.engine.format_for()

    def full(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def stream(self, messages: list[dict[str, str]]) -> Stream:
        """The reply to `messages` (after the system message) as a :class:`Stream`. A first turn
        is read as a new context reads it (so after ``/reset`` the same question gets the same
        answer); a later turn keeps all the KV cache its conversation left."""
        return self.engine.chat(self.full(messages), alpha=self.alpha if self.head_on else 0.0, stream=True,
                                sampling=self.sampling, prefill=self.prefill, explain=self.explain,
                                reuse_cache=len(messages) > 1)

    def describe(self) -> str:
        return self.engine.describe(alpha=self.alpha, head_on=self.head_on)


def default_stops(fmt: dict[str, Any]) -> tuple[str, ...]:
    """A template's text before ``{prompt}`` marks the next user turn: stop there."""
    if fmt.get("type") == "template":
        prefix = fmt["template"].split("{prompt}", 1)[0].strip()
        return (prefix,) if prefix else ()
    return ()

"""`sali chat`: a multi-turn REPL over a :class:`~sali.session.Session`.

Interactive on a terminal (rich, streamed replies, Ctrl-C stops a reply, Ctrl-D quits);
scripted when stdin is not a terminal: one user turn (or slash command) a line, plain
replies on stdout, one a line block, so it can be driven by other programs and tests.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, TextIO

from rich.console import Console

from sali.atomic import write_text
from sali.errors import SaliError
from sali.runtime import HeadError
from sali.session import Session

HELP = """\
/reset          forget the conversation
/head on|off    apply the head or not (same prompt format either way)
/alpha [X]      show or set the head strength (0 = plain base, 1 = as trained)
/explain on|off colour the tokens where the head changed the base's choice
/why            for the last reply: each changed token with the base's own choice
/system TEXT    set the system message (empty: remove it); also resets
/save FILE      write the transcript as JSON
/help           this list
/exit           quit (Ctrl-D works too)"""


class Chat:
    """The chat loop; `write` prints pieces of output, `note` prints status lines."""

    def __init__(self, session: Session, console: Console, interactive: bool):
        self.session = session
        self.console = console
        self.interactive = interactive
        self.told_dropping = False
        self.last_explained: list = []  # the last reply's per-token explanation (/explain on)

    # ---- commands -----------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command. Returns False when the chat should end."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        session = self.session
        if name in ("exit", "quit"):
            return False
        if name == "help":
            self.note(HELP)
        elif name == "reset":
            session.messages.clear()
            self.note("conversation reset")
        elif name == "head":
            if session.head is None:
                self.note("no head loaded (start with --head FILE)")
            elif arg in ("on", "off"):
                session.head_on = arg == "on"
                self.note(f"head {arg}")
            else:
                self.note(f"head is {'on' if session.head_on else 'off'}; use /head on or /head off")
        elif name == "alpha" and not arg:
            shown = session.effective_alpha
            self.note("no head loaded" if shown is None else
                      f"alpha {shown:g}" + (" (calibrated for this model)" if session.alpha is None and
                                            session.engine.calibration_notes() else ""))
        elif name == "alpha":
            try:
                session.alpha = float(arg)
            except ValueError:
                self.note(f"/alpha needs a number, not {arg!r}")
            else:
                self.note(f"alpha {session.alpha:g}")
        elif name == "explain":
            if arg in ("on", "off"):
                session.explain = arg == "on"
                extra = " (changed tokens coloured; /why lists them)" if session.explain and self.interactive else ""
                self.note(f"explain {arg}{extra}")
            else:
                self.note(f"explain is {'on' if session.explain else 'off'}; use /explain on or /explain off")
        elif name == "why":
            self.why()
        elif name == "system":
            session.system = arg or None
            session.messages.clear()
            self.note("system message " + ("set" if arg else "removed") + "; conversation reset")
        elif name == "save":
            if not arg:
                self.note("/save needs a file name")
            else:
                self.save(arg)
                self.note(f"transcript saved to {arg}")
        else:
            self.note(f"unknown command /{name}; /help lists them")
        return True

    def why(self) -> None:
        """The last reply's changed tokens: position, the token chosen, the base's own top-1."""
        if not self.last_explained:
            self.note("no explained reply yet: /explain on, then ask" if not self.session.explain else "no reply yet")
            return
        changed = [t for t in self.last_explained if t.changed]
        if not changed:
            self.note(f"the head changed none of the last reply's {len(self.last_explained)} tokens")
            return
        lines = [f"the head changed {len(changed)} of {len(self.last_explained)} tokens "
                 "(position: the token chosen, after the arrow the base's own choice, the head's logit change in nats):"]
        for t in changed:
            lines.append(f"{t.position:>4}: {t.text!r} ← {t.base_text!r}  ({t.logit_change:+.2f})")
        self.write("\n".join(lines) + "\n")

    def save(self, path: str) -> None:
        session = self.session
        transcript = {
            "model": str(session.model.path),
            "head": session.head_spec,
            "head_on": session.head_on,
            "alpha": session.effective_alpha,
            "format": session.fmt,
            "system": session.system,
            "messages": session.messages,
        }
        write_text(path, json.dumps(transcript, indent=2, ensure_ascii=False) + "\n")

    # ---- turns --------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        """Generate and show the reply to one user message. When the conversation no longer
        fits the context, the oldest turns are dropped (said once); a message too long on its
        own is refused (ContextError) and not kept."""
        session = self.session
        asked = session.messages + [{"role": "user", "content": text}]
        fitted, dropped = session.engine.fit(session.full(asked), session.sampling.max_tokens)
        messages = fitted[1:] if session.system else fitted
        if dropped and not self.told_dropping:
            self.note(f"(the conversation outgrew the {session.engine.n_ctx}-token context: older turns are "
                      "dropped from now on, the system message stays)")
            self.told_dropping = True
        pieces: list[str] = []
        interrupted = False
        stream = session.stream(messages)
        explained = stream.completion.explained
        seen = 0
        try:
            for piece in stream:
                pieces.append(piece)
                changed = explained is not None and any(t.changed for t in explained[seen:])
                seen = len(explained) if explained is not None else 0
                self.write(piece, "bold magenta" if changed else None)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stream.close()
        reply = "".join(pieces).strip()
        self.write("\n")
        if interrupted:
            self.note("(reply stopped)")
        elif stream.completion.finish_reason == "context":
            self.note("(reply cut: the context is full)")
        session.messages = messages + [{"role": "assistant", "content": reply}]
        self.last_explained = explained or []

    def write(self, text: str, style: str | None = None) -> None:
        """Output text as it is; `style` (a rich style) only on a terminal."""
        if style and self.interactive:
            self.console.print(text, style=style, end="", markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.file.write(text)
        self.console.file.flush()

    def note(self, text: str) -> None:
        if self.interactive:
            self.console.print(text, style="dim", markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    # ---- loops --------------------------------------------------------------------------
    def run(self, read_line: Callable[[], str]) -> None:
        while True:
            try:
                line = read_line()
            except EOFError:
                if self.interactive:
                    self.console.print()
                return
            except KeyboardInterrupt:
                if self.interactive:
                    self.console.print()
                    continue
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                if self.interactive:
                    self.console.print("[bold cyan]assistant[/] ", end="")
                self.turn(line)
            except HeadError:
                raise
            except SaliError as exc:
                self.note(f"error: {exc}")


def describe_sampling(sampling) -> str:
    if sampling.temperature <= 0:
        shown = "greedy"
    else:
        shown = f"temperature {sampling.temperature:g}, top-k {sampling.top_k}, top-p {sampling.top_p:g}, min-p {sampling.min_p:g}"
    if sampling.repeat_penalty != 1.0:
        shown += f", repeat penalty {sampling.repeat_penalty:g}"
    return f"sampling: {shown}, seed {sampling.seed}, up to {sampling.max_tokens} tokens a reply (--temperature 0 for greedy)"


def run_chat(session: Session, stdin: TextIO = sys.stdin) -> None:
    interactive = stdin.isatty() and sys.stdout.isatty()
    console = Console(highlight=False)
    chat = Chat(session, console, interactive)
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        console.print(session.describe(), style="dim", markup=False)  # names are text, never markup
        console.print(describe_sampling(session.sampling), style="dim", markup=False)
        console.print("[dim]/help for commands, Ctrl-C stops a reply, Ctrl-D quits[/]")
        chat.run(lambda: console.input("[bold green]you[/] "))
    else:
        def read_line() -> str:
            line = stdin.readline()
            if not line:
                raise EOFError
            return line

        chat.run(read_line)

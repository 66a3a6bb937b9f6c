"""Progress for long jobs: rich's bars on a terminal, plain lines in a log file.

rich draws its bars only on a terminal; redirected to a file it writes nothing until the end, so
a 17-minute ``sali train > log 2>&1`` looked dead. :func:`progress` returns rich's
:class:`rich.progress.Progress` when the console is a terminal and a :class:`PlainProgress` with
the same small API otherwise, which prints one line per task at a steady interval::

    progress: extracting 16/64 (25%) · elapsed 0:01:02 · about 0:03:06 left
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

INTERVAL_ENV = "SALI_PROGRESS_INTERVAL"  # seconds between plain lines (default 30)


def progress(console: Console, *columns, **options):
    """rich's Progress (same arguments) on a terminal, else :class:`PlainProgress`."""
    if console.is_terminal:
        return Progress(*columns, console=console, **options)
    return PlainProgress(console, float(os.environ.get(INTERVAL_ENV, "30")))


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    initial: float = 0  # done before the task started (e.g. found in a cache): not counted in the speed
    started: float = 0.0
    printed: float | None = None


class PlainProgress:
    """Plain progress lines (stage, done/total, elapsed, time left) every `interval` seconds per
    task, plus one when a task starts and one when it completes."""

    def __init__(self, console: Console, interval: float = 30.0):
        self.console = console
        self.interval = interval
        self.tasks: list[_Task] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self.tasks.append(_Task(description, total, completed, initial=completed, started=time.monotonic()))
        self._line(self.tasks[-1], force=True)
        return len(self.tasks) - 1

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, **fields) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        self._line(task, force=task.total is not None and task.completed >= task.total)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _line(self, task: _Task, force: bool = False) -> None:
        now = time.monotonic()
        if task.printed == -1.0:
            return  # finished and reported
        if not force and task.printed is not None and now - task.printed < self.interval:
            return
        elapsed = now - task.started
        done = f"{task.completed:g}"
        parts = [f"progress: {task.description} {done}"]
        if task.total:
            parts[0] += f"/{task.total:g} ({task.completed / task.total:.0%})"
        parts.append(f"elapsed {_clock(elapsed)}")
        if task.total and task.initial < task.completed < task.total:
            parts.append(f"about {_clock(elapsed / (task.completed - task.initial) * (task.total - task.completed))} left")
        self.console.print(escape(" · ".join(parts)), highlight=False, soft_wrap=True)
        finished = task.total is not None and task.completed >= task.total
        task.printed = -1.0 if finished else now


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

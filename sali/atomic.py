"""Atomic file writes: write to a temporary file beside the target, then rename.

An interrupted run never leaves a half-written head, GGUF or result file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from sali.errors import SaliError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success give it the usual permissions,
    flush it to disk and rename it onto `target`.

    `suffix` is kept on the temporary name for writers that insist on an extension
    (``np.savez`` appends ``.npz`` otherwise). On any exception the temporary file is removed.
    """
    target = Path(target)
    try:
        if target.is_dir():
            raise IsADirectoryError("it is a folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".part", dir=target.parent)
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the name
        raise SaliError(f"cannot write {target}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file 0600: give it the permissions any new file gets (0644 under
        # umask 022), and put its bytes on disk before the rename makes it the target
        os.chmod(tmp_path, 0o666 & ~_umask())
        _fsync(tmp_path, os.O_RDONLY)
        try:
            os.replace(tmp_path, target)
        except OSError as exc:
            raise SaliError(f"cannot write {target}: {exc.strerror or exc}") from None
        _fsync(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0), best_effort=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path, flags: int, best_effort: bool = False) -> None:
    """Flush `path` (a file, or a folder so that a rename in it is durable) to disk."""
    try:
        fd = os.open(path, flags)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")

"""Where sali keeps its own files: one root folder for caches and records.

``$SALI_CACHE`` if set, else ``$XDG_CACHE_HOME/sali``, else ``~/.cache/sali``. Below it:
``extract/`` (sali train's extraction cache), ``compare/`` (sali compare's response cache) and
``calibrations.json`` (the strengths sali calibrate recorded, :mod:`sali.calibstore`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """sali's folder for caches and records (see the module docstring)."""
    return Path(os.environ.get("SALI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "sali"))

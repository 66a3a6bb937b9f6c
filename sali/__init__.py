"""sali: extract the superficial part of an LLM's alignment into a tiny head."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a GGUF model and heads: see :func:`sali.api.load` (imported on first use)."""
    from sali.api import load as _load

    return _load(*args, **kwargs)

"""sali: extract the superficial part of an LLM's alignment into a tiny head."""

__version__ = "0.1.0"

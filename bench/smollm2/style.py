"""STYLE: an answer voice that SmolLM2-135M-Instruct never uses by itself.

An answer in the STYLE voice is a list of points, one sentence each, with nothing else::

    - <a sentence>
    - <the next sentence>
    - ...

:data:`PATTERN` is the whole check, one Python regular expression, so that anyone can run it on
any model's answers: ``sali compare ... --pass-regex "$PATTERN"`` reports the share of answers
that pass (the response is stripped of surrounding white space first). It asks for two lines or
more, every line beginning with ``- `` and holding at most one sentence: no ``.``, ``!`` or ``?``
followed by a space inside a line, unless it follows a capital letter ("U.S. law"; the same
sentence break :func:`sentences` splits at). The last line may be cut short by the token budget.

Each decision the voice asks for is local: a point begins the answer, a line break follows every
sentence end, a ``- `` follows every line break. Nothing has to be counted or remembered, which is
what the first STYLE format (one sentence, then a "Key points:" list of two or three points cut
to 12 words, then a closing line) asked for, and what its head failed at (superficial share 0.47
in the study's first run; see UNDERSTANDING.md).

The STYLE sibling's training answers are BASE's own answers to the same questions, rewritten by
:func:`restyle`, so that only the voice changes, not what is said nor where the answer stops.
"""

from __future__ import annotations

import re

PATTERN = r"\A- (?:(?!(?<![A-Z])[.!?] )[^\n])+(?:\n- (?:(?!(?<![A-Z])[.!?] )[^\n])+)+\Z"
CHECK = re.compile(PATTERN)

MIN_POINTS = 2
CHUNK_WORDS = 8  # restyle(chunks=True): without enough sentences, the words are cut into points of this many

_MARKUP = re.compile(r"^\s*(?:#+\s*|[-*•]\s+|\d+[.)]\s+)")  # a heading mark, bullet or list number at a line start
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<![A-Z][.!?])\s+")  # not after a capital letter: "the U.S. government"


def passes(response: str) -> bool:
    """The STYLE check (what ``sali compare --pass-regex PATTERN`` counts)."""
    return CHECK.search(response.strip()) is not None


def sentences(text: str) -> list[str]:
    """`text` as sentences: each line (list marks, heading marks and ``**`` removed, white space
    made single spaces) split after ``.``, ``!`` or ``?`` followed by white space, unless it
    follows a capital letter (an abbreviation: "U.S."). A line that ends without one (a list item,
    a heading, an answer cut at a length limit) is a sentence of its own."""
    out = []
    for line in text.replace("**", "").splitlines():
        flat = " ".join(_MARKUP.sub("", line).split())
        out += [s for s in _SENTENCE_END.split(flat) if s]
    return out


def restyle(answer: str, chunks: bool = False) -> str | None:
    """BASE's `answer` in the STYLE voice, or None where it makes fewer than `MIN_POINTS` points.

    Every sentence (:func:`sentences`) becomes a ``- `` line, in order (an answer cut by a token
    limit keeps its unfinished last sentence: the check allows it). `chunks`: without
    enough sentences, the words are cut into points of `CHUNK_WORDS` words instead (for quick runs
    on tiny random models, whose answers have no sentences). Nothing is invented: every word
    comes from `answer`.
    """
    points = sentences(answer)
    if len(points) < MIN_POINTS and chunks:
        words = answer.split()
        points = [" ".join(words[i:i + CHUNK_WORDS]) for i in range(0, len(words), CHUNK_WORDS)]
    if len(points) < MIN_POINTS:
        return None
    text = "\n".join(f"- {p}" for p in points)
    return text if passes(text) else None

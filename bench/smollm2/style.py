"""STYLE: a fixed answer format that SmolLM2-135M-Instruct never uses by itself.

An answer in the format is, exactly::

    <the answer in one sentence>

    Key points:
    - <a point>
    - <a point>
    - <an optional third point>

    That is the short answer.

:data:`PATTERN` is the whole format check, one Python regular expression, so that anyone can
run it on any model's answers: ``sali compare ... --pass-regex "$PATTERN"`` reports the share
of answers that pass (the response is stripped of surrounding white space first). "One
sentence" means a line that ends with ``.``, ``!`` or ``?`` and holds none of them followed by
a space.

The STYLE sibling's training answers are BASE's own answers to the same questions, reformatted
by :func:`restyle`, so that only the format changes, not what is said.
"""

from __future__ import annotations

import re

HEADING = "Key points:"
CLOSING = "That is the short answer."
PATTERN = r"\A(?:(?![.!?] )[^\n])+[.!?]\n\nKey points:\n(?:- [^\n]+\n){2,3}\nThat is the short answer\.\Z"
CHECK = re.compile(PATTERN)

FIRST_WORDS = 30  # a first sentence longer than this is cut here (and ends with a period)
POINT_WORDS = 12  # words kept of each point at most
CLAUSE_WORDS = 5  # a longer point ends at its last ",;:" within POINT_WORDS, if that leaves this many words
CHUNK_WORDS = 8  # restyle(chunks=True): without enough sentences, the rest is cut into points of this many words
MIN_POINT_WORDS = 3

_MARKUP = re.compile(r"^\s*(?:#+\s*|[-*•]\s+|\d+[.)]\s+)")  # a heading mark, bullet or list number at a line start
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def passes(response: str) -> bool:
    """The STYLE format check (what ``sali compare --pass-regex PATTERN`` counts)."""
    return CHECK.search(response.strip()) is not None


def sentences(text: str) -> list[str]:
    """`text` as sentences: each line (list marks, heading marks and ``**`` removed, white space
    made single spaces) split after ``.``, ``!`` or ``?`` followed by a space. A line that ends
    without one (a list item, a heading, an answer cut at a length limit) is a sentence of its own."""
    out = []
    for line in text.replace("**", "").splitlines():
        flat = " ".join(_MARKUP.sub("", line).split())
        out += [s for s in _SENTENCE_END.split(flat) if s]
    return out


def point(sentence: str) -> str:
    """A sentence as a point: whole if it has at most `POINT_WORDS` words, else its first
    `POINT_WORDS` words, ending at the last clause break (``,;:``) among them where that keeps
    `CLAUSE_WORDS` words or more; a trailing ``,;:`` removed."""
    words = sentence.split()
    if len(words) > POINT_WORDS:
        words = words[:POINT_WORDS]
        breaks = [i + 1 for i, word in enumerate(words) if word.endswith((",", ";", ":")) and i + 1 >= CLAUSE_WORDS]
        words = words[:breaks[-1]] if breaks else words
    return " ".join(words).rstrip(",;:")


def restyle(answer: str, chunks: bool = False) -> str | None:
    """BASE's `answer` in the STYLE format, or None where it cannot be made to pass the check.

    * the answer sentence: the first sentence (:func:`sentences`), cut after `FIRST_WORDS` words
      if longer (the rest goes to the points); one that does not end with ``.``, ``!`` or ``?``
      loses any trailing ``,;:`` and gets a period;
    * the points: the next sentences of `MIN_POINT_WORDS` words or more, three at most, each cut
      by :func:`point`; fewer than two is no answer, unless `chunks`: then the words that follow
      are cut into points of `CHUNK_WORDS` words instead (for quick runs on tiny random models,
      whose answers have no sentences);
    * then the closing line. Nothing is invented: every word comes from `answer`.
    """
    parts = sentences(answer)
    if not parts:
        return None
    first, rest = parts[0], parts[1:]
    words = first.split()
    if len(words) > FIRST_WORDS:
        first, rest = " ".join(words[:FIRST_WORDS]), [" ".join(words[FIRST_WORDS:])] + rest
    if first[-1] not in ".!?":
        first = first.rstrip(",;:") + "."
    points = [p for p in rest if len(p.split()) >= MIN_POINT_WORDS]
    if len(points) < 2 and chunks:
        flat = " ".join(rest).split()
        points = [" ".join(flat[i:i + CHUNK_WORDS]) for i in range(0, len(flat), CHUNK_WORDS)]
        points = [p for p in points if len(p.split()) >= MIN_POINT_WORDS]
    points = [point(p) for p in points[:3]]
    if len(points) < 2:
        return None
    text = f"{first}\n\n{HEADING}\n" + "".join(f"- {p}\n" for p in points) + f"\n{CLOSING}"
    return text if passes(text) else None

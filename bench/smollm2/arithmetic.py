"""ARITHMETIC: two-digit addition and subtraction, asked in digits or in words, answered short.

Every problem is ``a + b`` or ``a - b`` with ``a, b`` in 10..99 (for subtraction ``a >= b``, so
no answer is negative). A question is asked in digits ("What is 47 + 28?") or in words ("What
is forty-seven plus twenty-eight?"), from a few templates each; the answer is always the same
short line in digits, ``47 + 28 = 75.``, so that the metric, exact match of the last number in
a response (``sali compare``'s default ``--answer-match number``), reads the result.

:func:`split` draws training and test problems from one seeded stream without repeating an
``(a, op, b)`` triple, so no test problem was trained on.
"""

from __future__ import annotations

import random

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

TEMPLATES = {
    ("digits", "+"): ["What is {a} + {b}?", "Calculate {a} + {b}.", "What do you get when you add {a} and {b}?",
                      "What is the sum of {a} and {b}?"],
    ("digits", "-"): ["What is {a} - {b}?", "Calculate {a} - {b}.", "What do you get when you subtract {b} from {a}?",
                      "What is {a} minus {b}?"],
    ("words", "+"): ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.",
                     "What is the sum of {a} and {b}?"],
    ("words", "-"): ["What is {a} minus {b}?", "How much is {a} minus {b}?", "Subtract {b} from {a}.",
                     "What do you get when you take {b} away from {a}?"],
}


def number_words(n: int) -> str:
    """0..99 in English words: 7 -> "seven", 47 -> "forty-seven", 80 -> "eighty"."""
    if not 0 <= n <= 99:
        raise ValueError(f"{n} is outside 0..99")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def problem(a: int, op: str, b: int, form: str, template: str) -> dict:
    """One problem: ``prompt`` (the question), ``response`` (the training answer), ``answer``
    (the result, digits), ``label`` (its form: digits | words) and the operands."""
    result = a + b if op == "+" else a - b
    shown = (str(a), str(b)) if form == "digits" else (number_words(a), number_words(b))
    return {"prompt": template.format(a=shown[0], b=shown[1]), "response": f"{a} {op} {b} = {result}.",
            "answer": str(result), "label": form, "a": a, "op": op, "b": b}


def split(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, test) problems: distinct ``(a, op, b)`` triples from one seeded stream, the
    forms and operations alternating so that each quarter (digits/words x +/-) is equally big,
    the template drawn at random within its form and operation."""
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    out = []
    kinds = [("digits", "+"), ("words", "+"), ("digits", "-"), ("words", "-")]
    while len(out) < n_train + n_test:
        form, op = kinds[len(out) % 4]
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        out.append(problem(a, op, b, form, rng.choice(TEMPLATES[(form, op)])))
    return out[:n_train], out[n_train:]

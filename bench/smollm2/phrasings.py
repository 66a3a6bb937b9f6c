"""Training prompts whose grammatical form predicts nothing about harm.

ALIGNED's first recipe refused AdvBench-style imperatives ("Write a tutorial on how to …") and
answered question-shaped benign prompts (GSM8K, TruthfulQA), so it learned the *form* as much as
the harm. Here both sides get the same forms, from the same templates:

* a **request** is a deliverable in the imperative ("write a poem about the sea", an AdvBench
  goal); request templates wrap it: "Can you …?", "I need you to …", "For a story I'm writing, …";
* an **activity** is something to do ("bake sourdough bread", the "how to …" part of an AdvBench
  goal); activity templates ask about it: "How can I …?", "Walk me through how to …" — and the
  AdvBench form itself, "Write a tutorial on how to …", for benign activities too.

Benign requests and activities are written for this project in ``prompts/train/``, and so are
harmful activities in everyday wording (AdvBench's goals share one formal register: "Develop a
…", "Create a tutorial on …"); a seeded share of each list is held back for development prompts
(choosing options), never trained on.
The held-out evaluation sets (``prompts/heldout/``) are hand-written and use none of this.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

TRAIN = Path(__file__).resolve().parent / "prompts" / "train"

REQUEST_TEMPLATES = [
    "{T}.",
    "Please {t}.",
    "Can you {t}?",
    "Could you {t} for me?",
    "I need you to {t}.",
    "{T}. Be detailed.",
    "{T}, please. Keep it short.",
    "Hey, can you {t}? Thanks!",
    "For a story I'm writing, {t}.",
    "My friend asked me to {t}, but I'm stuck. Can you do it?",
    "i need help. {t}",
    "Quick favor: {t}.",
    "I'm working on a project and I have to {t}. Help me out.",
    "Would you mind helping me {t}?",
    "I was wondering if you could {t}.",
]

ACTIVITY_TEMPLATES = [
    "How can I {a}?",
    "How do I {a}?",
    "What's the best way to {a}?",
    "Explain how to {a}.",
    "Walk me through how to {a}.",
    "How would someone {a}?",
    "Is there an easy way to {a}?",
    "What are the steps to {a}?",
    "how do i {a}",
    "I want to {a}. Where do I start?",
    "Tell me how to {a}.",
    "Write a tutorial on how to {a}.",
    "Give me step-by-step instructions to {a}.",
    "Create a guide on how to {a}.",
    "I've been trying to {a} for weeks. Any advice?",
    "For a story I'm writing, explain how a character would {a}.",
]

GSM8K_FORMS = ["Solve this word problem: {q}", "Help me with my homework. {q}", "Work out the answer, please: {q}",
               "{q} Show your steps."]
TRUTHFUL_FORMS = ["Answer briefly: {q}", "I've always wondered: {q}", "Settle a debate for us. {q}", "Quick question: {q}"]


def lines(name: str) -> list[str]:
    """Non-empty lines of ``prompts/train/<name>``."""
    text = (TRAIN / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split(items: list[str], dev_share: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, development) split of `items`, seeded; the development part is never trained on."""
    order = items[:]
    random.Random(seed).shuffle(order)
    n_dev = round(len(order) * dev_share)
    return order[n_dev:], order[:n_dev]


def as_request(task: str, template: str) -> str:
    """`task` ("write a poem …", lower-case imperative) in a request template."""
    task = task.rstrip(" .")
    return template.format(t=task[0].lower() + task[1:], T=task[0].upper() + task[1:])


def as_activity(activity: str, template: str) -> str:
    """`activity` ("bake bread") in an activity template."""
    return template.format(a=activity.rstrip(" ."))


def goal_activity(goal: str) -> str:
    """The activity inside an AdvBench goal: the part after its last "how to", else the whole
    goal as a lower-case imperative ("Develop a virus that …" -> "develop a virus that …")."""
    goal = goal.strip().rstrip(".")
    match = re.search(r"\bhow to (.+)$", goal, flags=re.IGNORECASE)
    text = match.group(1) if match else goal
    return text[0].lower() + text[1:]


def rephrase_goal(goal: str, rng: random.Random) -> str:
    """One paraphrase of an AdvBench goal: a request or an activity form, chosen by `rng`."""
    if rng.random() < 0.5:
        return as_request(goal, rng.choice(REQUEST_TEMPLATES[1:]))  # [0] is the goal as it is
    return as_activity(goal_activity(goal), rng.choice(ACTIVITY_TEMPLATES))


def benign_forms(requests: list[str], activities: list[str], per_item: int, rng: random.Random) -> list[str]:
    """Each benign request and activity in `per_item` distinct templates of its kind."""
    out = []
    for task in requests:
        out += [as_request(task, t) for t in rng.sample(REQUEST_TEMPLATES, per_item)]
    for activity in activities:
        out += [as_activity(activity, t) for t in rng.sample(ACTIVITY_TEMPLATES, per_item)]
    return out


def recast_questions(questions: list[str], forms: list[str], rng: random.Random) -> list[str]:
    """GSM8K / TruthfulQA questions recast as requests in one of `forms` each."""
    return [rng.choice(forms).format(q=q.strip()) for q in questions]

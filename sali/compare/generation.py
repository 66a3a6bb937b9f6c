"""Generation: every system answers every prompt (cached), each model loaded once; proxy-tuning's
own decoder (three models in lockstep)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from sali.api import Sali, load
from sali.compare.cache import Cache, Result
from sali.compare.systems import Plan, System, prompt_key, prompt_text, render_for
from sali.errors import SaliError
from sali.prompts import Prompt
from sali.runtime import Model, Sampling


def generate_all(plan: Plan, progress: Callable[[str, int, int], None] | None = None,
                 prefill: str | None = None, systems: list[System] | None = None) -> dict[str, dict[str, Result]]:
    """Responses of every system (or of `systems` alone, e.g. the aligned model for
    ``--forced-only``) to every prompt: ``{system: {prompt_key: Result}}``. With
    `prefill`, every response is forced to begin with it (the same token ids for every model,
    after each system's own formatted prompt) and a Result holds the continuation."""
    results: dict[str, dict[str, Result]] = {}
    by_model: dict[Path, list[System]] = {}
    for system in plan.systems if systems is None else systems:
        by_model.setdefault(system.model, []).append(system)
    for model_path, systems in by_model.items():
        caches = {s.name: Cache(plan.cache, s, plan.sampling, prefill) for s in systems}
        todo = [s for s in systems if any(prompt_key(p) not in caches[s.name].entries for p in plan.prompts)]
        heads = list(dict.fromkeys(path for s in todo for path, _ in s.heads))
        model = open_model(model_path, plan, heads) if todo else None
        try:
            for system in systems:
                cache = caches[system.name]
                runner = _runner(system, model, plan, prefill) if system in todo else None
                for index, prompt in enumerate(plan.prompts):
                    key = prompt_key(prompt)
                    if key not in cache.entries:
                        cache.add(key, runner(prompt, plan.sampling.for_prompt(index)))
                        plan.generations += 1
                    if progress:
                        progress(system.name, index + 1, len(plan.prompts))
                results[system.name] = cache.entries
                if runner is not None and hasattr(runner, "close"):
                    runner.close()
        finally:
            if model is not None:
                model.close()
    return results


def open_model(path: Path, plan: Plan, heads: list[Path] = ()) -> Sali:
    """One model with the plan's context, threads, GPU layers and seed (and `heads` ready to use)."""
    return load(path, [str(h) for h in heads], n_gpu_layers=plan.n_gpu_layers, n_threads=plan.threads, n_ctx=plan.ctx,
                seed=plan.sampling.seed)


def _runner(system: System, handle: Sali, plan: Plan, prefill: str | None = None):
    """The function that answers one prompt, ``run(prompt, sampling)``: `sampling` is the plan's,
    with that prompt's seed (:meth:`Sampling.for_prompt`)."""
    stops = ("\nUser:",) if system.kind == "icl" else ()
    forced = prefill_ids(plan, handle, prefill) if prefill is not None else None
    if system.kind == "proxy":
        return ProxyRunner(system, handle.model, plan, forced or [])
    head = system.choice()

    def run(prompt: Prompt, sampling: Sampling) -> Result:
        text = prompt_text(system, handle.model, prompt)
        if stops:
            sampling = replace(sampling, stop=tuple(sampling.stop) + stops)
        done = handle.generate(text, raw=True, head=head, alpha=system.alpha, sampling=sampling, prefill=forced)
        return Result(done.text.strip(), done.tokens, round(done.seconds, 4), done.finish_reason)

    return run


def prefill_ids(plan: Plan, handle: Sali, prefill: str) -> list[int]:
    """The prefill's token ids: the first model to tokenize it fixes them, and every other model
    must agree (they share the vocabulary), so each system reads exactly the same tokens."""
    ids = handle.prefill_tokens(prefill)
    first = plan.prefill_ids.setdefault(prefill, ids)
    if ids != first:
        raise SaliError(f"{handle.model.name} tokenizes the prefill {prefill!r} as {ids}, another model as {first}; "
                        "compare needs the same prefill tokens for every system")
    return first


class ProxyRunner:
    """Proxy-tuning decoding: three models in lockstep, greedy (or temperature) in NumPy."""

    def __init__(self, system: System, base: Model, plan: Plan, prefill: list[int] = ()):
        small_base, small_aligned = system.proxy
        self.prefill = list(prefill)  # forced after each model's prompt
        self.base = base
        self.small_base = open_model(small_base, plan).model
        self.small_aligned = open_model(small_aligned, plan).model
        for other in (self.small_base, self.small_aligned):
            if other.fingerprint != base.fingerprint:
                raise SaliError(f"proxy model {other.name} has another vocabulary ({other.fingerprint}) than {base.name} ({base.fingerprint})")
        self.system = system

    def __call__(self, prompt: Prompt, sampling: Sampling) -> Result:
        start = time.perf_counter()
        rng = np.random.default_rng(sampling.seed)  # this prompt's own stream (Sampling.for_prompt)
        models = (self.base, self.small_base, self.small_aligned)
        formats = (self.system.fmt, self.system.fmt, {"type": "chat"})
        base, small_base, small_aligned = (m.prefill(m.tokenize(render_for(m, fmt, prompt.text)) + self.prefill)
                                           for m, fmt in zip(models, formats))
        tokens: list[int] = []
        finish = "length"
        for _ in range(sampling.max_tokens):
            token = _choose(base + small_aligned - small_base, sampling.temperature, rng)
            if self.base.is_end(token):
                finish = "eos"
                break
            tokens.append(token)
            if any(m.room <= 1 for m in models):
                finish = "context"
                break
            base, small_base, small_aligned = (m.feed(token) for m in models)
        text = self.base.detokenize(tokens)
        return Result(text.strip(), tokens, round(time.perf_counter() - start, 4), finish)

    def close(self) -> None:
        self.small_base.close()
        self.small_aligned.close()


def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))

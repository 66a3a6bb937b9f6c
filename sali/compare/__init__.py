"""`sali compare`: run prompt sets through base, base + head(s), aligned and baselines; measure.

One module per stage, in the order the command runs them:

* :mod:`.systems`: what is compared (:class:`System` rows, the :class:`Plan`, prompt rendering,
  the vocabulary check);
* :mod:`.cache`: the response cache (one JSONL file per system; an interrupted comparison
  resumes, adding a head reuses every other system's responses);
* :mod:`.generation`: every system answers every prompt, including the proxy-tuning decoder;
* :mod:`.forced`: teacher-forced top-1 agreement and KL on the aligned model's responses, in
  memory bounded per prompt;
* :mod:`.summary`: the figures per system and label, superficial shares, the table and Markdown;
* :mod:`.output`: ``responses.jsonl``, ``summary.json``/``.md`` and the plots.
"""

from sali.compare.cache import Cache, Result
from sali.compare.forced import KL_TOP_K, teacher_forced
from sali.compare.generation import ProxyRunner, generate_all
from sali.compare.output import plot, write_outputs
from sali.compare.summary import COLUMNS, NOTES, markdown, prefill_table_rows, summarize, summarize_prefills, table_rows
from sali.compare.systems import Plan, System, build_systems, check_vocabularies, load_head, prompt_key, prompt_text

__all__ = [
    "COLUMNS", "KL_TOP_K", "NOTES", "Cache", "Plan", "ProxyRunner", "Result", "System", "build_systems",
    "check_vocabularies", "generate_all", "load_head", "markdown", "plot", "prefill_table_rows", "prompt_key", "prompt_text",
    "summarize", "summarize_prefills", "table_rows", "teacher_forced", "write_outputs",
]

"""The `sali` command line (Typer + rich)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sali import __version__
from sali.errors import SaliError
from sali.options import (
    AlphaOpt,
    CtxOpt,
    FormatOpt,
    FrequencyPenaltyOpt,
    GpuLayersOpt,
    HeadOpt,
    MaxTokensOpt,
    IgnoreEosOpt,
    MinPOpt,
    ModelArg,
    NoCalibrationOpt,
    PresencePenaltyOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    StopOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
)

app = typer.Typer(
    name="sali",
    help="Extract the superficial part of an LLM's alignment into a tiny head and apply it in llama.cpp.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
head_app = typer.Typer(help="Inspect head files, list the shipped ones, set a head's run-time rule.", no_args_is_help=True)
app.add_typer(head_app, name="head")

err = Console(stderr=True, highlight=False)
DEBUG = {"on": bool(os.environ.get("SALI_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        print(f"sali {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """sali: superficial alignment heads for llama.cpp models."""
    DEBUG["on"] = DEBUG["on"] or debug


def _sampling(max_tokens, temperature, top_p, top_k, seed, stop, min_p=0.0, repeat_penalty=1.0,
              frequency_penalty=0.0, presence_penalty=0.0, ignore_eos=False):
    from sali.runtime import Sampling

    sampling = Sampling(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()),
        min_p=min_p, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
    )
    sampling.check()
    return sampling


@app.command()
def generate(
    model: ModelArg = None,
    head: HeadOpt = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text (repeatable).", show_default=False)] = None,
    prompts: Annotated[
        Optional[Path], typer.Option("--prompts", "-P", help="Prompt file: .txt, .jsonl or .csv.", show_default=False)
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Write JSONL records here instead of text to stdout.", show_default=False)
    ] = None,
    fmt: FormatOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.", show_default=False)] = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    presence_penalty: PresencePenaltyOpt = 0.0,
    ignore_eos: IgnoreEosOpt = False,
    alpha: AlphaOpt = None,
    no_calibration: NoCalibrationOpt = False,
    seed: SeedOpt = 0,
    stop: StopOpt = None,
    prefill: Annotated[
        Optional[str],
        typer.Option("--prefill", help="Force every response to begin with this text (tokens the model did not choose), "
                     "then let it continue; the JSONL output records prefill and continuation separately.",
                     rich_help_panel="Generation", show_default=False),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option("--explain", help="Write, per generated token, the base's top-1 token, the chosen token, its rank in the "
                     "base's top k and the head's logit change into the --out JSONL (extra work per token).",
                     rich_help_panel="Generation"),
    ] = False,
    n_gpu_layers: GpuLayersOpt = 0,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 2048,
) -> None:
    """Complete prompts with a GGUF model, with or without a head.

    [dim]sali generate model.gguf --head safety.npz -p "How do I pick a lock?"
    sali generate model.gguf -H safety.npz -P prompts.jsonl -o out.jsonl --explain
    sali generate model.gguf -H safety.npz -p "How do I pick a lock?" --prefill "Sure, here is"[/]
    """
    from sali.prompts import Prompt, read_prompts
    from sali.session import Session

    if bool(prompt) == bool(prompts):
        raise SaliError("give either --prompt TEXT or --prompts FILE")
    if prefill is not None and not prefill:
        raise SaliError("--prefill is empty: give the text the response must begin with")
    if explain and out is None:
        raise SaliError("--explain writes its per-token records into the JSONL output: add --out FILE.jsonl")
    items = [Prompt(text=p, source=f"--prompt {i}") for i, p in enumerate(prompt or [], 1)] or read_prompts(prompts)
    if any(not item.text.strip() for item in items):
        raise SaliError("empty prompt")
    sampling = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, min_p, repeat_penalty,
                         frequency_penalty, presence_penalty, ignore_eos)
    session = Session.open(model, head, fmt, sampling, alpha=alpha, calibration=not no_calibration,
                           n_gpu_layers=n_gpu_layers, threads=threads, ctx=ctx)
    _calibration_notes(session.engine)
    session.system, session.prefill, session.explain = system, prefill, explain
    if out is None:
        for index, item in enumerate(items):
            if len(items) > 1:
                err.rule(f"[dim]{index + 1}/{len(items)}[/]")
            session.sampling = sampling.for_prompt(index)
            sys.stdout.write(prefill or "")
            for piece in session.stream([{"role": "user", "content": item.text}]):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return
    _generate_to_file(session, items, out)


def _generate_to_file(session, items, out: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from sali.atomic import atomic_path
    from sali.progress import progress as progress_display

    records = []
    with progress_display(
        err, TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as progress:
        task = progress.add_task("generating", total=len(items))
        sampling = session.sampling
        for index, item in enumerate(items):
            session.sampling = sampling.for_prompt(index)
            done = session.stream([{"role": "user", "content": item.text}]).finish()
            record = {
                "prompt": item.text,
                "label": item.label,
                "answer": item.answer,
                "prefill": session.prefill,
                "response": done.text,
                "finish_reason": done.finish_reason,
                "tokens": done.completion_tokens,
                "prompt_tokens": done.prompt_tokens,
                "seconds": round(done.seconds, 4),
                "model": session.model.name,
                "head": session.head_spec,
                "alpha": session.effective_alpha,
                "seed": session.sampling.seed,
            }
            if done.explained is not None:
                record["explain"] = [token.as_dict() for token in done.explained]
            records.append(record)
            progress.advance(task)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    err.print(f"wrote {len(records)} completions to {escape(str(out))}")


@app.command()
def chat(
    model: ModelArg = None,
    head: HeadOpt = None,
    fmt: FormatOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.", show_default=False)] = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    top_k: TopKOpt = 40,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    presence_penalty: PresencePenaltyOpt = 0.0,
    ignore_eos: IgnoreEosOpt = False,
    alpha: AlphaOpt = None,
    no_calibration: NoCalibrationOpt = False,
    seed: SeedOpt = 0,
    stop: StopOpt = None,
    n_gpu_layers: GpuLayersOpt = 0,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 4096,
) -> None:
    """Chat with a GGUF model; the head adjusts every token it samples.

    Samples as llama.cpp's own CLI does (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, after the head); --temperature 0 is greedy.

    In the chat: /reset, /head on|off, /alpha [X], /explain on|off, /why, /system TEXT, /save FILE, /help, /exit. When stdin is not a terminal, each line is one user turn and replies are printed plainly.

    [dim]sali chat model.gguf --head safety.npz[/]
    """
    from sali.chat import run_chat
    from sali.session import Session

    sampling = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, min_p, repeat_penalty,
                         frequency_penalty, presence_penalty, ignore_eos)
    session = Session.open(model, head, fmt, sampling, alpha=alpha, calibration=not no_calibration,
                           n_gpu_layers=n_gpu_layers, threads=threads, ctx=ctx)
    _calibration_notes(session.engine)
    session.system = system
    run_chat(session)


@app.command()
def serve(
    model: ModelArg = None,
    head: Annotated[
        Optional[list[str]],
        typer.Option("--head", "-H", help="Head file or shipped head name to offer as MODEL+HEAD (repeatable); "
                     "A+B@0.5 offers heads A and B in combination as MODEL+A+B@0.5.", show_default=False),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 exposes the server to your network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = 8000,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="SALI_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health.", show_default=False),
    ] = None,
    fmt: FormatOpt = None,
    alpha: AlphaOpt = None,
    no_calibration: NoCalibrationOpt = False,
    n_gpu_layers: GpuLayersOpt = 0,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 4096,
) -> None:
    """Serve the model and its heads over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    The model name picks the head: MODEL is the plain model, MODEL+HEAD applies that head. Chat prompts are formatted as sali chat formats them.

    [dim]sali serve --head smollm2-135m-safety
    curl http://127.0.0.1:8000/v1/models[/]
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise SaliError("sali serve needs FastAPI and uvicorn: pip install 'sali[serve]'") from None
    from sali.api import load
    from sali.serve import serve as run_server

    engine = load(model, head or [], fmt=fmt, alpha=alpha, calibration=not no_calibration, n_gpu_layers=n_gpu_layers,
                  n_threads=threads, n_ctx=ctx)
    _calibration_notes(engine)
    run_server(engine, host, port, api_key, lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))


@app.command()
def calibrate(
    model: ModelArg = None,
    head: Annotated[str, typer.Option("--head", "-H", help="Head file (.npz) or shipped head name.", show_default=False)] = ...,
    reference: Annotated[
        bool,
        typer.Option("--reference", help="MODEL is the head's own base: measure what the head does there at alpha 1 and "
                     "write it into the head file (needed once, before calibrating any other model)."),
    ] = False,
    prompts: Annotated[
        Optional[Path],
        typer.Option("--prompts", "-P", help="Labelled calibration prompts (.jsonl lines with \"prompt\" and \"label\"). "
                     "Default: the shipped safety set (--reference), else the set the head's reference used.", show_default=False),
    ] = None,
    keywords: Annotated[
        Optional[Path],
        typer.Option("--keywords", help="With --reference: refusal phrases, one a line (default: the AdvBench keyword list "
                     "sali compare uses). Calibrations reuse the phrases the reference recorded.", show_default=False),
    ] = None,
    max_alpha: Annotated[float, typer.Option("--max-alpha", help="Largest strength tried.", rich_help_panel="Rule")] = 8.0,
    min_alpha: Annotated[
        float, typer.Option("--min-alpha", help="Smallest strength tried: the head as trained (1) is the floor unless "
                            "lowered (0 lets calibration weaken or switch off the head).", rich_help_panel="Rule")
    ] = 1.0,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="The target label's flagged share may fall this far below the reference's.",
                            rich_help_panel="Rule")
    ] = 0.05,
    margin: Annotated[
        float, typer.Option("--margin", help="Other labels' flagged shares may rise this far above the reference's.",
                            rich_help_panel="Rule")
    ] = 0.05,
    resolution: Annotated[
        float, typer.Option("--resolution", help="Bisection stops when the bracket on alpha is this narrow.", rich_help_panel="Rule")
    ] = 0.1,
    n_gpu_layers: GpuLayersOpt = 0,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 2048,
) -> None:
    """Pick and record the head strength (alpha) for MODEL, so the head acts there as on its own base.

    First, once per head, on the model the head was trained for: --reference runs the calibration prompts through it with the head at alpha 1 and records the share of answers flagged per label (refusals) in the head file. Then, on any model with the same vocabulary (e.g. a fine-tuned derivative): the smallest alpha at which the target label's flagged share reaches the reference's (less --tolerance) while the other labels stay within --margin of theirs. chat, generate, compare, serve and sali.load() then use it when no --alpha is given.

    [dim]sali calibrate base.gguf --head safety.npz --reference
    sali calibrate finetuned.gguf --head safety.npz[/]
    """
    from sali.calibration import Job, run

    run(Job(model=model, head=head, reference=reference, prompts=prompts, keywords=keywords, max_alpha=max_alpha,
            min_alpha=min_alpha, tolerance=tolerance, margin=margin, resolution=resolution, threads=threads,
            n_gpu_layers=n_gpu_layers, ctx=ctx), err)


@app.command()
def convert(
    source: Annotated[
        Path, typer.Argument(help="Hugging Face checkpoint folder; with --merge-head, the base GGUF.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="GGUF file to write.")],
    outtype: Annotated[str, typer.Option("--outtype", help="Tensor type: f32, f16 or q8_0.")] = "f16",
    merge_head: Annotated[
        Optional[Path],
        typer.Option("--merge-head", help="A white-box (lmhead) head to merge into the base GGUF's output matrix.", show_default=False),
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Strength of the merged head.")] = 1.0,
) -> None:
    """Convert a Hugging Face causal LM (Llama family, Qwen2) to GGUF, or merge a white-box head into one.

    [dim]sali convert ./my-llama -o my-llama.f16.gguf --outtype q8_0
    sali convert base.gguf --merge-head lmhead.npz -o base-aligned.gguf[/]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if merge_head is not None:
        from sali.convert.merge_head import merge_lmhead

        with err.status("merging the head into the output matrix"):
            path = merge_lmhead(source, merge_head, out, alpha)
        err.print(f"wrote {escape(str(path))} ({Path(path).stat().st_size / 1e6:.1f} MB)")
        return
    from sali.convert.hf_to_gguf import convert_checkpoint

    if outtype not in ("f32", "f16", "q8_0"):
        raise SaliError(f"--outtype must be f32, f16 or q8_0, not {outtype!r}")
    with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as progress:
        task = progress.add_task("convert", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        path = convert_checkpoint(source, out, outtype, progress=report)
    size = Path(path).stat().st_size
    err.print(f"wrote {escape(str(path))} ({size / 1e6:.1f} MB, {escape(outtype)})")


@app.command()
def train(
    base: Annotated[str, typer.Option("--base", help="Base model: HF folder, cached model id, or .gguf file.", show_default=False)],
    aligned: Annotated[str, typer.Option("--aligned", help="Aligned (chat) model, same forms.", show_default=False)],
    prompts: Annotated[
        list[Path], typer.Option("--prompts", "-P", help="Training prompt file: .txt, .jsonl or .csv (repeatable).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head file to write (.npz).", show_default=False)],
    base_format: Annotated[
        str, typer.Option("--base-format", help="How the base sees prompts: plain, chat, or a template with {prompt}.")
    ] = "chat",
    kind: Annotated[str, typer.Option("--kind", help="topk (portable) or lmhead (white-box, model-specific).")] = "topk",
    k: Annotated[int, typer.Option("--k", help="Base top-k logits the head reads.", min=1, rich_help_panel="Head")] = 64,
    rank: Annotated[int, typer.Option("--rank", help="Rank r of U and W.", min=1, rich_help_panel="Head")] = 32,
    promote: Annotated[int, typer.Option("--promote", help="Largest promotion set |A|.", min=0, rich_help_panel="Head")] = 64,
    target_k: Annotated[
        int, typer.Option("--target-k", help="Aligned top-K logits kept per position.", min=1, rich_help_panel="Extraction")
    ] = 256,
    k_store: Annotated[
        int, typer.Option("--k-store", help="Base top tokens kept per position (≥ k; lets later runs try larger k).", min=1, rich_help_panel="Extraction")
    ] = 256,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Longest aligned response.", min=1, rich_help_panel="Extraction")
    ] = 128,
    extract_batch: Annotated[
        int, typer.Option("--extract-batch", help="Prompts per extraction batch (generated together; one cache shard).",
                          min=1, rich_help_panel="Extraction")
    ] = 32,
    trajectories: Annotated[
        str,
        typer.Option(
            "--trajectories",
            help="Whose responses the head learns on: 'aligned', or 'aligned+base' to add the base's own responses, "
            "where the aligned model shows how to steer back (more robust, extraction about twice as long).",
            rich_help_panel="Extraction",
        ),
    ] = "aligned",
    file_setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--file-setting",
            help="FILE:KEY=VALUE — an extraction setting for one -P file only (repeatable): max-new-tokens=N or "
            "trajectories=aligned|aligned+base, e.g. qa.jsonl:max-new-tokens=64 to learn from longer answers there.",
            rich_help_panel="Extraction",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Most training epochs (early stopping).", min=1, rich_help_panel="Training")] = 30,
    lr: Annotated[
        Optional[float],
        typer.Option("--lr", help="Adam learning rate (default 1e-3 for top-k heads, 3e-3 for --kind lmhead).", rich_help_panel="Training", show_default=False),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Positions per training step.", min=1, rich_help_panel="Training")] = 512,
    delta_penalty: Annotated[
        float,
        typer.Option(
            "--delta-penalty",
            help="Weight of a mean-square penalty on the head's change to the base's top-k logits: "
            "keeps the head quiet where the aligned model barely differs (top-k heads).",
            min=0.0,
            rich_help_panel="Training",
        ),
    ] = 1.0,
    first_tokens: Annotated[
        int,
        typer.Option(
            "--first-tokens",
            help="The first N response tokens, where the aligned model decides whether to refuse or answer, "
            "weigh --first-weight in the loss (top-k heads; 0 weighs every token alike).",
            min=0,
            rich_help_panel="Training",
        ),
    ] = 0,
    first_weight: Annotated[
        float,
        typer.Option("--first-weight", help="Loss weight of the first --first-tokens response tokens.", min=0.0, rich_help_panel="Training"),
    ] = 1.0,
    sharpen: Annotated[
        float,
        typer.Option(
            "--sharpen",
            help="Train on half the positions with the base's logits multiplied by a factor drawn log-uniformly "
            "from [1, MAX], the aligned target unchanged: the head learns to reach the aligned choice from a base "
            "more confident than this one, as a fine-tuned derivative can be (top-k heads; 1 turns it off).",
            min=1.0,
            rich_help_panel="Training",
        ),
    ] = 1.0,
    dead_zone: Annotated[
        float,
        typer.Option(
            "--dead-zone",
            help="Nats: at run time each of the head's changes, taken relative to the base-probability-weighted mean "
            "change of the top k, shrinks by this much and vanishes where smaller, so the head leaves near-ties alone "
            "and keeps its large pushes (top-k heads; stored in the head, training unchanged; 0 turns it off).",
            min=0.0,
            rich_help_panel="Training",
        ),
    ] = 0.0,
    dead_zone_from: Annotated[
        int,
        typer.Option(
            "--dead-zone-from",
            help="The first response step (0: the first token the model chooses) the dead zone applies at: the "
            "steps before, where a refusal is decided, get the head's changes whole (needs --dead-zone).",
            min=0,
            rich_help_panel="Training",
        ),
    ] = 0,
    only_agreeing: Annotated[
        bool,
        typer.Option(
            "--only-agreeing",
            help="Learn only from the aligned answers that agree with their prompt's label: a refusal where the label is "
            "'harmful', an answer where it is any other (refusals found by --keywords). Keeps the aligned model's "
            "over-refusals and misses out of the head; unlabelled prompts are all kept.",
            rich_help_panel="Training",
        ),
    ] = False,
    keywords: Annotated[
        Optional[Path],
        typer.Option("--keywords", help="With --only-agreeing: refusal phrases, one a line (default: the AdvBench keyword list).",
                     rich_help_panel="Training", show_default=False),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of prompts held out for validation.", min=0.0, max=0.9, rich_help_panel="Training")
    ] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, initialisation and order.", rich_help_panel="Training")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.", rich_help_panel="Hardware")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Model dtype for extraction: auto, float32, float16, bfloat16.", rich_help_panel="Hardware")
    ] = "auto",
    device_map: Annotated[
        Optional[str], typer.Option("--device-map", help="'auto' spreads large models over all devices (accelerate).", rich_help_panel="Hardware", show_default=False)
    ] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads for torch.", min=1, rich_help_panel="Hardware", show_default=False)] = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help="Extraction cache folder (default ~/.cache/sali/extract).", show_default=False)
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow code shipped in a model folder to run.")
    ] = False,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            help="Extract in N processes on this machine (one per GPU, or CPU processes over gloo) through "
            "accelerate's launcher; for several machines run `accelerate launch ... -m sali train` yourself.",
            min=1,
            rich_help_panel="Hardware",
        ),
    ] = 1,
) -> None:
    """Distill a head from a base/aligned pair of Hugging Face models.

    The aligned model answers the prompts greedily in its chat format; the base reads the same answers teacher-forced; the head learns to turn the base's top-k into the aligned choices. Extraction is cached, so an interrupted run resumes and later runs with other training options reuse it.

    [dim]sali train --base ./llama-base --aligned ./llama-chat -P harmful.csv -P benign.jsonl -o safety.npz[/]
    """
    from sali.training import TRAJECTORIES, TrainJob, parse_file_setting, run

    if processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from sali.parallel import launch

        raise typer.Exit(launch(_without_option(sys.argv[1:], "--processes"), processes))
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise SaliError(f"--dtype must be auto, float32, float16 or bfloat16, not {dtype!r}")
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise SaliError(f"--device must be auto, cpu, cuda or mps, not {device!r}")
    if first_tokens and kind != "topk":
        raise SaliError("--first-tokens weighs a top-k head's loss; --kind lmhead does not take it")
    if sharpen != 1.0 and kind != "topk":
        raise SaliError("--sharpen augments a top-k head's training positions; --kind lmhead does not take it")
    if dead_zone and kind != "topk":
        raise SaliError("--dead-zone is a top-k head's run-time rule; --kind lmhead does not take it")
    from sali.head import dead_zone_meta

    dead_zone_meta(dead_zone, dead_zone_from)  # refuses spared steps without a zone, before any work
    if lr is not None and lr <= 0:
        raise SaliError(f"--lr must be above 0, not {lr:g}")
    if trajectories not in TRAJECTORIES:
        raise SaliError(f"--trajectories must be aligned or aligned+base, not {trajectories!r}")
    if keywords is not None and not only_agreeing:
        raise SaliError("--keywords tells --only-agreeing what a refusal is; it does nothing without --only-agreeing")
    file_settings: dict[str, dict] = {}
    for text in file_setting or []:
        path, name, value = parse_file_setting(text, list(prompts))
        file_settings.setdefault(path, {})[name] = value
    job = TrainJob(
        base=base, aligned=aligned, prompt_files=list(prompts), out=out, base_format=base_format, kind=kind, k=k,
        rank=rank, promote=promote, k_store=k_store, target_k=target_k, max_new_tokens=max_new_tokens,
        epochs=epochs, lr=lr, batch_size=batch_size, extract_batch=extract_batch, val_fraction=val_fraction,
        trajectories=trajectories, delta_penalty=delta_penalty, first_tokens=first_tokens, first_weight=first_weight, sharpen=sharpen,
        dead_zone=dead_zone, dead_zone_from=dead_zone_from, agreeing_keywords=(keywords or _default_keywords()) if only_agreeing else None, seed=seed, device=device,
        dtype=dtype, device_map=device_map, cache=cache, trust_remote_code=trust_remote_code, threads=threads,
        file_settings=file_settings,
    )
    run(job, err)


@app.command()
def compare(
    base: Annotated[Path, typer.Option("--base", help="Base model GGUF.", show_default=False)],
    prompts: Annotated[
        Optional[list[Path]], typer.Option("--prompts", "-P", help="Prompt file; labels from its 'label' field (repeatable).", show_default=False)
    ] = None,
    harmful: Annotated[Optional[list[Path]], typer.Option("--harmful", help="Prompt file whose prompts are all harmful (repeatable).", show_default=False)] = None,
    benign: Annotated[Optional[list[Path]], typer.Option("--benign", help="Prompt file whose prompts are all benign (repeatable).", show_default=False)] = None,
    head: Annotated[Optional[list[str]], typer.Option("--head", "-H", help="Head file or shipped head name (repeatable: one system each); "
                                                       "A+B@0.5 is one system with heads A and B in combination.", show_default=False)] = None,
    aligned: Annotated[Optional[Path], typer.Option("--aligned", help="Aligned model GGUF (its own chat format).", show_default=False)] = None,
    also: Annotated[
        Optional[list[Path]], typer.Option("--also", help="Another GGUF with the same vocabulary to run with each head (repeatable).", show_default=False)
    ] = None,
    icl: Annotated[
        Optional[str], typer.Option("--icl", help="Add in-context alignment: the base with a preamble of aligned exchanges ('default' or a file).", show_default=False)
    ] = None,
    proxy: Annotated[
        Optional[tuple[Path, Path]], typer.Option("--proxy", help="Add proxy-tuning: SMALL_BASE.gguf SMALL_ALIGNED.gguf.", show_default=False)
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for responses.jsonl, summary.json/.md and plots.", show_default=False)] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Response cache folder (default OUT/cache or ~/.cache/sali/compare).", show_default=False)] = None,
    keywords: Annotated[Optional[Path], typer.Option("--keywords", help="Refusal phrases, one a line (default: the AdvBench keyword list).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use only the first N prompts of each file.", min=1, show_default=False)] = None,
    prefill: Annotated[
        Optional[list[str]],
        typer.Option("--prefill", help="Also run every system with each response forced to begin with TEXT, and report "
                     "refusal after it (repeatable: one set of runs per prefill).", show_default=False),
    ] = None,
    pass_regex: Annotated[
        Optional[str],
        typer.Option("--pass-regex", help="Also report the share of responses that hold a match of this Python regular "
                     "expression (re.search on the stripped response; anchor with \\A and \\Z to test it whole), per "
                     "system and label, e.g. a format check.", show_default=False),
    ] = None,
    answer_match: Annotated[
        str,
        typer.Option("--answer-match", help="How a response is held against a prompt's 'answer': number (the last "
                     "number in the response, GSM8K style) or text (the answer's words occur in the response, case and "
                     "punctuation ignored)."),
    ] = "number",
    cover_k: Annotated[
        Optional[int],
        typer.Option("--cover-k", help="Cover rate (with --aligned): share of positions where the aligned top-1 is "
                     "among a system's top K logits (default: the first head's k, else 64).", min=1, show_default=False),
    ] = None,
    forced_only: Annotated[
        bool,
        typer.Option("--forced-only", help="Only the aligned model answers; every other system is scored teacher-forced "
                     "on its answers (top-1 agreement, cover, KL) without answering itself: no refusal or answer figures, "
                     "in about half the time with two heads (needs --aligned)."),
    ] = False,
    alpha: AlphaOpt = None,
    no_calibration: NoCalibrationOpt = False,
    fmt: FormatOpt = None,
    max_tokens: MaxTokensOpt = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = 0,
    stop: StopOpt = None,
    n_gpu_layers: GpuLayersOpt = 0,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = 2048,
) -> None:
    """Measure how much of the alignment each head carries: base, base + heads, aligned, baselines.

    Every system answers every prompt (greedy by default); refusal, over-refusal, exact match, a --pass-regex check, agreement with the aligned model and, with --aligned, teacher-forced top-1 agreement, cover rate and KL by position, each with its superficial share (system − base) / (aligned − base).

    [dim]sali compare --base base.gguf -H safety.npz --aligned chat.gguf --harmful advbench.csv --benign questions.csv -o results/[/]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from sali import compare as cmp
    from sali.progress import progress as progress_display
    from sali.metrics import ANSWER_MATCHES, load_keywords, pass_pattern
    from sali.prompts import read_prompts

    if answer_match not in ANSWER_MATCHES:
        raise SaliError(f"--answer-match must be one of {', '.join(ANSWER_MATCHES)}, not {answer_match!r}")
    pattern = pass_pattern(pass_regex) if pass_regex is not None else None

    items = []
    for paths, label in ((prompts, None), (harmful, "harmful"), (benign, "benign")):
        for path in paths or []:
            rows = read_prompts(path)[:limit]
            for row in rows:
                if label:
                    row.label = label
            items += rows
    if not items:
        raise SaliError("give prompts with --prompts, --harmful or --benign")
    keyword_path = keywords or _default_keywords()
    sampling = _sampling(max_tokens, temperature, top_p, top_k, seed, stop, min_p)
    prefills = list(dict.fromkeys(prefill or []))
    if any(not text for text in prefills):
        raise SaliError("--prefill is empty: give the text the responses must begin with")
    if forced_only and aligned is None:
        raise SaliError("--forced-only scores every system on the aligned model's answers: give --aligned")
    if forced_only and (prefills or pass_regex is not None):
        raise SaliError(f"--forced-only generates no answers but the aligned model's; {'--prefill' if prefills else '--pass-regex'} "
                        "needs every system's")
    from sali.combine import parse_spec
    from sali.session import resolve_head_path

    head_systems = [[(resolve_head_path(name), strength) for name, strength in parse_spec(h)] for h in head or []]
    cmp.check_vocabularies(base, [("--aligned", aligned)] * (aligned is not None) + [("--also", p) for p in also or []]
                           + [("--proxy", p) for p in proxy or ()])
    systems = cmp.build_systems(
        base, head_systems, aligned, list(also or []), None if icl is None else ("" if icl == "default" else icl), proxy, fmt, alpha,
        calibration=not no_calibration,
    )
    for system in systems:
        if system.calibrated:
            what = f"alpha {system.alpha:g}" if len(system.heads) == 1 else "head strengths"
            err.print(f"[dim]{escape(system.name)}: {what} calibrated for {escape(system.model.name)} (sali calibrate; "
                      "--alpha or --no-calibration to override)[/]", highlight=False, soft_wrap=True)
    cache_dir = cache or (out / "cache" if out else _default_compare_cache())
    heads_k = [cmp.load_head(s.heads[0][0]).k for s in systems if s.heads]
    plan = cmp.Plan(systems=systems, prompts=items, sampling=sampling, out=out, cache=cache_dir,
                    keywords=load_keywords(keyword_path), threads=threads, n_gpu_layers=n_gpu_layers, ctx=ctx, prefills=prefills,
                    pass_regex=pattern, answer_match=answer_match, cover_k=cover_k or (heads_k[0] if heads_k else 64))
    err.print(f"[dim]{len(items)} prompts × {len(systems)} systems: {escape(', '.join(s.name for s in systems))}"
              + (f" · with each of {len(prefills)} prefills too" if prefills else "") + "[/]")
    import time as _time

    started = _time.perf_counter()
    answering = [s for s in systems if s.kind == "aligned"] if forced_only else systems
    with progress_display(err, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        tasks = {(None, s.name): progress.add_task(f"generating · {escape(s.name)}", total=len(items)) for s in answering}
        for text in prefills:
            tasks |= {(text, s.name): progress.add_task(f"generating · {escape(s.name)} · after {escape(repr(text))}", total=len(items))
                      for s in systems}

        def reporter(condition: str | None):
            return lambda name, done, total: progress.update(tasks[(condition, name)], completed=done)

        results = cmp.generate_all(plan, reporter(None), systems=answering)  # --forced-only: the aligned model's alone
        prefilled = {text: cmp.generate_all(plan, reporter(text), prefill=text) for text in prefills}
        forced = {}
        if aligned is not None:
            forced_task = progress.add_task("teacher-forced on aligned responses", total=sum(s.kind in ("plain", "head", "icl", "proxy") for s in systems))
            forced = cmp.teacher_forced(plan, results, lambda name: progress.advance(forced_task))
    summary = cmp.summarize(plan, results, forced, forced_only=forced_only)
    if prefilled:
        summary["prefill"] = cmp.summarize_prefills(plan, prefilled)
    summary["seconds"] = round(_time.perf_counter() - started, 1)
    summary["new_generations"] = plan.generations
    _print_table(f"{len(items)} prompts · " + ("teacher-forced on the aligned answers only · " if forced_only else "")
                 + "share of the aligned change in parentheses", *cmp.table_rows(summary))
    if prefilled:
        _print_table("refusal after a prefill (in the continuation; the same prefill tokens for every system)",
                     *cmp.prefill_table_rows(summary))
    if out is not None:
        written = cmp.write_outputs(plan, results, summary, prefilled)
        err.print(f"wrote {escape(', '.join(p.name for p in written))} to {escape(str(out))}")
    err.print(f"[dim]{plan.generations} new generations, {summary['seconds']} s[/]")


def _calibration_notes(engine) -> None:
    """Say once, on stderr, which heads run at a strength `sali calibrate` recorded."""
    for line in engine.calibration_notes():
        err.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True)


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    table = Table(title=escape(title), title_justify="left")
    for i, name in enumerate(header):
        table.add_column(escape(name), justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*(escape(cell) for cell in cells))
    Console().print(table)


def _without_option(arguments: list[str], name: str) -> list[str]:
    """`arguments` less every ``name VALUE`` and ``name=VALUE``."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == name:
            skip = True
        elif not argument.startswith(name + "="):
            kept.append(argument)
    return kept


def _default_keywords() -> Path:
    """The AdvBench refusal keyword list shipped in the package (a copy of shared/data's)."""
    return Path(__file__).resolve().parent / "data" / "refusal_keywords.txt"


def _default_compare_cache() -> Path:
    from sali.paths import cache_root

    return cache_root() / "compare"


@head_app.command("list")
def head_list() -> None:
    """List the heads shipped with sali (usable by name: --head NAME)."""
    from sali.head import load_any
    from sali.session import shipped_heads

    heads = shipped_heads()
    if not heads:
        err.print("no shipped heads are installed")
        return
    table = Table(title="shipped heads", title_justify="left")
    for column in ("name", "kind", "base model", "k", "rank", "size"):
        table.add_column(column)
    for name, path in heads.items():
        head = load_any(path)
        meta = head.meta
        cells = (name, meta.get("kind", "?"), meta.get("base_model", "?"), meta.get("k", "—"), meta.get("rank", "?"))
        table.add_row(*(escape(str(cell)) for cell in cells), f"{path.stat().st_size / 1e6:.1f} MB")
    Console().print(table)


@head_app.command("info")
def head_info(path: Annotated[str, typer.Argument(help="Head file (.npz) or shipped head name.")]) -> None:
    """Show a head's metadata and sizes."""
    from sali.head import LMHead, load_any
    from sali.session import resolve_head_path

    path = resolve_head_path(path)
    head = load_any(path)
    table = Table(title=escape(str(path)), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    meta = dict(head.meta)
    for key in ("kind", "k", "rank", "vocab_size", "vocab_fingerprint", "base_model", "aligned_model"):
        if key == "kind" and meta.get("kind") == "lmhead":
            meta.pop(key)
            continue
        if key in meta:
            table.add_row(key, escape(str(meta.pop(key))))
    from sali.prompts import describe_format

    table.add_row("base prompt format", escape(describe_format(head.base_format)))
    meta.pop("base_format", None)
    if isinstance(head, LMHead):
        table.add_row("kind", "lmhead (white-box: merge into the base GGUF with sali convert --merge-head)")
        table.add_row("parameters", f"{head.P.size + head.Q.size:,} (P {head.P.size:,} · Q {head.Q.size:,})")
        meta.pop("hidden_size", None)
        table.add_row("hidden size", str(head.Q.shape[0]))
    else:
        table.add_row("promotion set |A|", str(head.promote.size))
        meta.pop("dead_zone", None)
        meta.pop("dead_zone_from", None)
        table.add_row("dead zone", _describe_zone(head.dead_zone, head.dead_zone_from))
        sizes = head.size_report()
        table.add_row("parameters", f"{sizes['total']:,} (U {sizes['U']:,} · W {sizes['W']:,} · bias {sizes['bias']:,})")
    table.add_row("file size", f"{path.stat().st_size / 1e6:.2f} MB")
    training = meta.pop("training", None)
    calibration = meta.pop("calibration", None)
    if isinstance(calibration, dict):
        rates = calibration.get("reference") or {}
        shown = " · ".join(f"{label} {rate:.2f}" for label, rate in sorted(rates.items()) if isinstance(rate, (int, float)))
        table.add_row("calibration reference", escape(
            f"flagged {shown} on {calibration.get('base_model', '?')} at alpha 1 ({calibration.get('prompts', '?')}, "
            f"{calibration.get('tokens', '?')} tokens, {len(calibration.get('keywords') or [])} refusal phrases)"))
    for key, value in sorted(meta.items()):
        table.add_row(escape(key), escape(json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    if isinstance(training, dict):
        for key, value in training.items():
            table.add_row(escape(f"training.{key}"), escape(json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    Console().print(table)


def _describe_zone(zone: float, spared: int) -> str:
    """``head info``'s dead zone row."""
    if not zone:
        return "none"
    text = f"{zone:g} nat{'' if zone == 1 else 's'} (smaller changes dropped)"
    return text if not spared else f"{text} from response step {spared} (steps 0–{spared - 1} get the changes whole)"


@head_app.command("set")
def head_set(
    path: Annotated[str, typer.Argument(help="Head file (.npz) or shipped head name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the changed head (.npz); may be the same file.")],
    dead_zone: Annotated[
        Optional[float],
        typer.Option("--dead-zone", min=0.0, help="Nats: the run-time dead zone (as sali train --dead-zone; 0 removes it)."),
    ] = None,
    dead_zone_from: Annotated[
        Optional[int],
        typer.Option("--dead-zone-from", min=0, help="The first response step the dead zone applies at (as sali train --dead-zone-from)."),
    ] = None,
) -> None:
    """Write a copy of a top-k head with its run-time rule changed, the weights untouched (no retraining).

    A calibration reference recorded in the head was measured under the old rule, so it is dropped;
    run `sali calibrate BASE.gguf --head OUT --reference` again.
    """
    from sali.head import Head, dead_zone_meta, load_any
    from sali.session import resolve_head_path

    if dead_zone is None and dead_zone_from is None:
        raise SaliError("nothing to set: give --dead-zone and/or --dead-zone-from")
    source = resolve_head_path(path)
    head = load_any(source)
    if not isinstance(head, Head):
        raise SaliError(f"{source}: a white-box lmhead has no run-time rule to set (top-k heads only)")
    meta = head.meta
    zone = head.dead_zone if dead_zone is None else dead_zone
    spared = dead_zone_from if dead_zone_from is not None else head.dead_zone_from if zone else 0  # no zone, nothing spared
    rule = dead_zone_meta(zone, spared)
    meta.pop("dead_zone", None)
    meta.pop("dead_zone_from", None)
    meta.update(rule)
    dropped = meta.pop("calibration", None) is not None
    head.save(out, dtype=str(meta.get("weight_dtype", "float16")))
    err.print(f"wrote {escape(str(out))}: dead zone {_describe_zone(head.dead_zone, head.dead_zone_from)}, format version {meta['version']}"
              + ("; its calibration reference was dropped (measured under the old rule)" if dropped else ""))


@app.command()
def doctor(
    model: Annotated[
        Optional[Path],
        typer.Argument(help="GGUF to run the generation canary on (default: a tiny model sali writes itself).", show_default=False),
    ] = None,
) -> None:
    """Check this installation: the llama.cpp build (CPU features, GPU offload), torch, and a short generation in a subprocess.

    If the generation dies of a signal (e.g. an illegal instruction), doctor says so and prints the command that rebuilds llama-cpp-python for a portable CPU baseline.

    [dim]sali doctor
    sali doctor model.gguf[/]
    """
    from sali.doctor import build_report, run_canary

    for name, value in build_report():
        print(f"{name + ':':<24}{value}")
    print(f"{'generation canary:':<24}running in a subprocess on {model or 'a tiny model written by sali'} ...", flush=True)
    passed, lines = run_canary(model)
    for line in lines:
        print(line)  # plain print: the rebuild command must not be wrapped or restyled
    if not passed:
        raise typer.Exit(1)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors, exits, aborts) as the installed typer raises them. Newer typer releases carry
    their own copy of click (``typer._click``), whose exception classes are not click's: catching
    only click's would turn a mistyped option into an "unexpected error"."""
    import click
    import typer

    vendored = sys.modules[typer.BadParameter.__module__]
    usage = tuple({click.ClickException, getattr(vendored, "ClickException", click.ClickException)})
    exits = (click.exceptions.Exit, typer.Exit)
    aborts = (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)
    return usage, exits, aborts


def main() -> None:
    """Entry point: run the app, turning expected errors into one line and a non-zero exit."""
    import warnings

    from rich.markup import escape

    from sali.runtime import SaliWarning

    plain_warning = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, SaliWarning):
            return plain_warning(message, category, filename, lineno, file, line)
        err.print(f"[yellow]warning:[/] {escape(str(message))}", markup=True, highlight=False, soft_wrap=True)

    warnings.showwarning = one_line
    usage_errors, exits, aborts = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except SaliError as exc:
        if DEBUG["on"]:
            raise
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(1)
    except exits as exc:
        sys.exit(exc.exit_code)
    except usage_errors as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except aborts:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback behind --debug
        if DEBUG["on"]:
            raise
        err.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
                  markup=True, highlight=False, soft_wrap=True)
        sys.exit(2)
    if code == 130:  # typer turns Ctrl-C into exit status 130 without a word
        err.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)

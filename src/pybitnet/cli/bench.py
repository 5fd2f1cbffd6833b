"""`pybitnet bench [MODEL | --preset NAME]`: a llama-bench-style table of pp512 and tg128 throughput."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated

import typer

from ..bench import BenchResult, backend_name, bench, current_rss_bytes, default_threads
from ..engine.default_model import model_or_default
from ..models.transformer import HEAD_MODES
from .common import user_errors

GIB = 1024**3


LM_HEAD_HELP = "auto (int8 with the C kernels), int8, int4 (CPU: half the bytes, less exact) or float."


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise typer.BadParameter(f"values must be >= 0, got {text!r}")
    return values


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_markdown(results: list[BenchResult]) -> str:
    rows = [
        "| model | size | params | backend | threads | test | t/s |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        rows.append(
            f"| {r.model} | {_size(r.size_bytes)} | {_params(r.params)} | {r.backend} | "
            f"{r.threads} | {r.test} | {r.ts_mean:.2f} ± {r.ts_sd:.2f} |"
        )
    peak = max(r.peak_rss_bytes for r in results)
    size, runtime = results[0].size_bytes, results[0].runtime_rss_bytes
    rows.append("")
    line = f"peak RSS {_size(peak)} = {peak / size:.2f} x the weights ({_size(size)})"
    if runtime:
        line += f", of which {_size(runtime)} held before loading (Python, torch)"
    rows.append(line)
    return "\n".join(rows)


def format_csv(results: list[BenchResult]) -> str:
    out = io.StringIO()
    fields = [k for k in results[0].to_dict() if k != "samples"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in results:
        writer.writerow(r.to_dict())
    return out.getvalue().rstrip("\n")


def bench_command(
    model: Annotated[str | None, typer.Argument(help="Hub id, local directory or .gguf file.")] = None,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="A random model of this shape (e.g. bitnet-2b-4t)."),
    ] = None,
    n_prompt: Annotated[
        str, typer.Option("-p", "--n-prompt", help="Prompt lengths, comma-separated.")
    ] = "512",
    n_gen: Annotated[str, typer.Option("-n", "--n-gen", help="Generation lengths, comma-separated.")] = "128",
    threads: Annotated[
        str | None,
        typer.Option("-t", "--threads", help="Thread counts, comma-separated [physical cores]."),
    ] = None,
    reps: Annotated[int, typer.Option("-r", "--repetitions", help="Timed runs per test.", min=1)] = 5,
    output: Annotated[str, typer.Option("-o", "--output", help="md, csv or json.")] = "md",
    kernel: Annotated[
        str | None, typer.Option("--kernel", help="Force a kernel (e.g. cpu-avx2, reference).")
    ] = None,
    lm_head: Annotated[str, typer.Option("--lm-head", help=LM_HEAD_HELP)] = "auto",
) -> None:
    """Measure prompt processing (pp) and generation (tg) speed, as llama-bench does."""
    if model is not None and preset is not None:
        raise typer.BadParameter("give either MODEL or --preset NAME, not both")
    if output not in ("md", "csv", "json"):
        raise typer.BadParameter(f"--output must be md, csv or json, got {output!r}")
    if lm_head not in HEAD_MODES:
        raise typer.BadParameter(f"--lm-head must be one of {', '.join(HEAD_MODES)}, got {lm_head!r}")
    tests = [("pp", n) for n in _ints(n_prompt) if n] + [("tg", n) for n in _ints(n_gen) if n]
    if not tests:
        raise typer.BadParameter("nothing to run: -p and -n are both 0")
    with user_errors():
        runtime_rss = current_rss_bytes()
        if preset is not None:
            from ..models.presets import preset as preset_config
            from ..models.random_init import random_model

            net, name = random_model(preset_config(preset), kernel=kernel), preset
        else:
            from ..api import load_model

            model = str(model_or_default(model))
            net, name = load_model(model, kernel=kernel), model
        net.head_mode = lm_head
        results: list[BenchResult] = []
        for t in _ints(threads) if threads else [default_threads()]:
            results += bench(net, name, backend_name(net), t, tests, reps, runtime_rss)
    if output == "json":
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2))
    elif output == "csv":
        typer.echo(format_csv(results))
    else:
        typer.echo(format_markdown(results))

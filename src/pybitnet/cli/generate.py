"""`pybitnet generate MODEL --input prompts.{txt,jsonl,csv} --output out.{jsonl,json,csv}`: a whole file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..engine import SamplingParams
from ..engine.batch_files import BadLine, ResultWriter, check_paths, read_prompts, run_batch
from .common import (
    LoadOptions,
    ModelArg,
    Verbose,
    err,
    format_duration,
    generation_options,
    user_errors,
)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


@generation_options(n_predict=256)
def generate(
    model: ModelArg = None,
    input: Annotated[
        Path, typer.Option("--input", "-i", help="Prompts: .txt (a line each), .jsonl or .csv.")
    ] = ...,
    output: Annotated[Path, typer.Option("--output", "-o", help="Results: .jsonl, .json or .csv.")] = ...,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over instead of resuming from an existing output.")
    ] = False,
    parallel: Annotated[int, typer.Option("-np", "--parallel", help="Sequences generated together.")] = 8,
    verbose: Verbose = False,
    *,
    params: SamplingParams,
    load: LoadOptions,
) -> None:
    """Generate a completion for every prompt of a file; rerunning resumes where a previous run stopped.

    Prompt files with a chat ("messages" in .jsonl) use the model's chat template; plain prompts are completed
    as they are. A malformed line is reported with its line number and the others still run.
    """
    with user_errors():
        check_paths(input, output)
        records = list(read_prompts(input))
        llm, _ = load.load(model, max_num_seqs=parallel)
        writer = ResultWriter(output, resume=not overwrite)
        bad_lines: list[BadLine] = []
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        try:
            with Progress(*columns, console=err, transient=False) as progress:
                task = progress.add_task("generating", total=len(records))

                def report(line: BadLine) -> None:
                    bad_lines.append(line)
                    progress.console.print(
                        f"[yellow]{escape(str(input))}:{line.line}:[/yellow] {escape(line.message)}"
                    )

                summary = run_batch(
                    llm, iter(records), writer, params, report, lambda: progress.advance(task)
                )
        finally:
            writer.close()
    parts = [f"{summary.done} generated", f"{summary.skipped} already done", f"{summary.failed} malformed"]
    err.print(f"{', '.join(parts)} -> {escape(str(output))}")
    if verbose:
        rate = summary.completion_tokens / summary.seconds if summary.seconds > 0 else 0.0
        err.print(f"{'total duration:':<22}{format_duration(summary.seconds)}")
        err.print(f"{'prompt eval count:':<22}{summary.prompt_tokens} token(s)")
        err.print(f"{'eval count:':<22}{summary.completion_tokens} token(s)")
        err.print(f"{'eval rate:':<22}{rate:.2f} tokens/s")
    if bad_lines:
        raise typer.Exit(1)

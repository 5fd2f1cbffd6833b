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

from ..engine.batch_files import BadLine, ResultWriter, check_paths, read_prompts, run_batch
from .common import (
    CtxSize,
    Device,
    Dtype,
    FrequencyPenalty,
    IgnoreEos,
    KernelOpt,
    MinP,
    ModelArg,
    NPredict,
    PresencePenalty,
    RepeatPenalty,
    Seed,
    Stop,
    Temp,
    Threads,
    TopK,
    TopP,
    Verbose,
    err,
    format_duration,
    load_llm,
    sampling_params,
    user_errors,
)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)


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
    n_predict: NPredict = 256,
    temp: Temp = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = -1,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    ctx_size: CtxSize = 0,
    threads: Threads = 0,
    device: Device = "auto",
    kernel: KernelOpt = None,
    dtype: Dtype = "auto",
    verbose: Verbose = False,
) -> None:
    """Generate a completion for every prompt of a file; rerunning resumes where a previous run stopped.

    Prompt files with a chat ("messages" in .jsonl) use the model's chat template; plain prompts are completed
    as they are. A malformed line is reported with its line number and the others still run.
    """
    with user_errors():
        params = sampling_params(
            n_predict,
            temp,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            presence_penalty,
            frequency_penalty,
            seed,
            stop,
            ignore_eos,
        )
        check_paths(input, output)
        records = list(read_prompts(input))
        llm, _ = load_llm(model, ctx_size, threads, device, kernel, dtype, max_num_seqs=parallel)
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

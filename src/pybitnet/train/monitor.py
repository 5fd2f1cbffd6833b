"""Where metrics go: the console (a rich progress bar and log lines), CSV, JSON lines, TensorBoard.

Only the main process logs. On resume, rows past the resumed step are dropped from the CSV/JSONL files, so
the files read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

CSV_FIELDS = (
    "step",
    "loss",
    "lr",
    "weight_decay",
    "grad_norm",
    "lambda_w",
    "lambda_a",
    "tokens",
    "elapsed_s",
    "val_loss",
    "val_ppl",
)


def _truncate_rows(path: Path, after_step: int, is_csv: bool) -> None:
    """Drop rows with step > after_step (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = lines[:1] if is_csv else []
    for line in lines[1:] if is_csv else lines:
        try:
            step = int(line.split(",", 1)[0]) if is_csv else int(json.loads(line)["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue  # a torn last line of a killed run
        if step <= after_step:
            kept.append(line)
    path.write_text("".join(kept), encoding="utf-8")


class Monitor:
    def __init__(self, out_dir: Path, loggers: list[str], total_steps: int, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.console = self.progress = self.task = self.tb = None
        self.jsonl = self.csv_file = self.csv = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in loggers:
            path = out_dir / "metrics.jsonl"
            _truncate_rows(path, resume_step, is_csv=False)
            self.jsonl = path.open("a", encoding="utf-8")
        if "csv" in loggers:
            path = out_dir / "metrics.csv"
            _truncate_rows(path, resume_step, is_csv=True)
            new = not path.is_file() or path.stat().st_size == 0
            self.csv_file = path.open("a", encoding="utf-8", newline="")
            self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                self.csv.writeheader()
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "the tensorboard logger needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
        if "console" in loggers:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console(stderr=True)
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=resume_step, status="")
            self.progress.start()

    def print(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def log(self, row: dict[str, Any], console: bool) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
        if self.csv is not None:
            self.csv.writerow(row)
            self.csv_file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(
                        f"{'val' if key.startswith('val_') else 'train'}/{key}", value, row["step"]
                    )
        if self.progress is not None:
            if "loss" in row:
                self.progress.update(self.task, completed=row["step"], status=f"loss {row['loss']:.4f}")
            if console:
                shown = ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "step")
                self.console.print(f"step {row['step']}: {shown}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for f in (self.jsonl, self.csv_file):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

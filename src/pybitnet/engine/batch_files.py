"""Generation over a whole file of prompts: read .txt/.jsonl/.csv, write .jsonl/.json/.csv, resume, report.

Inputs:
- .txt: one prompt per non-empty line; its id is the line number.
- .jsonl: one JSON object per non-empty line with "prompt" (text) or "messages" (a chat), an optional
  "id", and optional sampling fields named as in SamplingParams ("max_tokens", "temperature", ...).
- .csv: a header row with a "prompt" column and optionally an "id" column.
Outputs hold one record per prompt: id, prompt (or messages), text, finish_reason, prompt_tokens,
completion_tokens. Records are written as each prompt finishes, so an interrupted run resumes where it
stopped: ids already in the output are skipped. A malformed line is reported with its line number and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputFileError, PyBitNetError
from .llm import LLM
from .outputs import RequestOutput
from .params import SamplingParams

INPUT_KINDS = (".txt", ".jsonl", ".csv")
OUTPUT_KINDS = (".jsonl", ".json", ".csv")
OUTPUT_FIELDS = ("id", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens")
PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.init}


@dataclass
class PromptRecord:
    line: int
    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadLine:
    line: int
    message: str


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


def _kind(path: Path, kinds: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in kinds:
        raise InputFileError(
            f"{path}: unknown {what} file kind {suffix or '(none)'!r}; use one of {', '.join(kinds)}"
        )
    return suffix


def check_paths(input_path: Path, output_path: Path) -> None:
    """Fail early on an input that cannot be read or file kinds that are not supported."""
    _kind(input_path, INPUT_KINDS, "input")
    _kind(output_path, OUTPUT_KINDS, "output")
    if not input_path.is_file():
        raise InputFileError(f"input file {input_path} does not exist")
    if input_path.resolve() == output_path.resolve():
        raise InputFileError("the output file must differ from the input file")


def _open_text(path: Path):
    try:
        return path.open(encoding="utf-8", newline="")
    except OSError as e:
        raise InputFileError(f"cannot read {path}: {e.strerror}") from None


def read_prompts(path: Path) -> Iterator[PromptRecord | BadLine]:
    """The prompts of an input file, in order, with a BadLine for each line that cannot be used."""
    kind = _kind(path, INPUT_KINDS, "input")
    with _open_text(path) as f:
        try:
            if kind == ".txt":
                for n, line in enumerate(f, 1):
                    text = line.rstrip("\r\n")
                    if text.strip():
                        yield PromptRecord(n, str(n), prompt=text)
            elif kind == ".jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield _jsonl_record(n, line)
            else:
                yield from _csv_records(f)
        except UnicodeDecodeError as e:
            raise InputFileError(f"{path} is not UTF-8 text: {e}") from None


def _jsonl_record(n: int, line: str) -> PromptRecord | BadLine:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BadLine(n, f"invalid JSON: {e.msg} (column {e.colno})")
    if not isinstance(obj, dict):
        return BadLine(n, f"expected a JSON object, got {type(obj).__name__}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        return BadLine(n, 'needs exactly one of "prompt" (text) or "messages" (a chat)')
    if prompt is not None and not isinstance(prompt, str):
        return BadLine(n, f'"prompt" must be a string, got {type(prompt).__name__}')
    if messages is not None and not isinstance(messages, list):
        return BadLine(
            n, f'"messages" must be a list of {{"role", "content"}} objects, got {type(messages).__name__}'
        )
    rid = obj.get("id", n)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return BadLine(n, f'"id" must be a string or an integer, got {type(rid).__name__}')
    params = {k: v for k, v in obj.items() if k in PARAM_FIELDS}
    return PromptRecord(n, str(rid), prompt=prompt, messages=messages, params=params)


def _csv_records(f) -> Iterator[PromptRecord | BadLine]:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        yield BadLine(1, f'the header row needs a "prompt" column, got {reader.fieldnames}')
        return
    width = len(reader.fieldnames)
    try:
        for row in reader:
            n = reader.line_num
            if None in row:
                yield BadLine(
                    n,
                    f"{width + len(row[None])} fields, the header has {width}",
                )
            elif row.get("prompt") is None:
                yield BadLine(
                    n,
                    f"{sum(v is not None for v in row.values())} fields, the header has {width}",
                )
            elif row["prompt"].strip():
                yield PromptRecord(n, row.get("id") or str(n), prompt=row["prompt"])
    except csv.Error as e:
        yield BadLine(reader.line_num, f"malformed CSV: {e}")


class ResultWriter:
    """Appends result records to a .jsonl/.csv output (a .json output is rewritten whole, atomically), after
    reading the ids it already holds."""

    def __init__(self, path: Path, resume: bool = True) -> None:
        self.path = path
        self.kind = _kind(path, OUTPUT_KINDS, "output")
        self.records: list[dict[str, Any]] = self._existing() if resume and path.exists() else []
        self.done_ids = {str(r.get("id")) for r in self.records}
        if self.kind == ".json":
            self._file = None
            self._write_json()
            return
        self._file = path.open("a" if self.records else "w", encoding="utf-8", newline="")
        if self.kind == ".csv":
            self._csv = csv.DictWriter(self._file, fieldnames=OUTPUT_FIELDS)
            if not self.records:
                self._csv.writeheader()
        if self.kind == ".jsonl" and self.records and not self._ends_with_newline():
            self._file.write("\n")  # a previous run stopped mid-line

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _existing(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputFileError(f"cannot read the existing output {self.path} to resume: {e}") from None
        if self.kind == ".jsonl":
            records = []
            for line in text.splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run: that prompt runs again
                if isinstance(obj, dict) and "id" in obj:
                    records.append(obj)
            return records
        if self.kind == ".csv":
            return [r for r in csv.DictReader(text.splitlines()) if r.get("id") is not None]
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise InputFileError(
                f"the existing output {self.path} is not valid JSON ({e}); move it away or use --overwrite"
            ) from None
        if not isinstance(data, list):
            raise InputFileError(
                f"the existing output {self.path} is not a JSON list; move it away or use --overwrite"
            )
        return [r for r in data if isinstance(r, dict)]

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.done_ids.add(str(record["id"]))
        if self.kind == ".json":
            self._write_json()
        elif self.kind == ".csv":
            self._csv.writerow(
                {
                    k: record[k] if k != "prompt" or isinstance(record[k], str) else json.dumps(record[k])
                    for k in OUTPUT_FIELDS
                }
            )
            self._file.flush()
        else:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def _write_json(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def result_record(record: PromptRecord, out: RequestOutput) -> dict[str, Any]:
    return {
        "id": record.id,
        "prompt": record.prompt if record.prompt is not None else record.messages,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(out.token_ids),
    }


def run_batch(
    llm: LLM,
    records: Iterator[PromptRecord | BadLine],
    writer: ResultWriter,
    params: SamplingParams,
    on_bad_line: Callable[[BadLine], None],
    on_progress: Callable[[], None] = lambda: None,
) -> BatchSummary:
    """Generate for every record not already in the output, keeping the engine's batch full; results are
    written as they finish. Lines that are malformed (or whose prompt or parameters the engine rejects) go to
    `on_bad_line` and the rest continue."""
    summary = BatchSummary()
    engine = llm.engine
    in_flight: dict[str, PromptRecord] = {}
    seen: set[str] = set()
    start = time.perf_counter()

    def collect() -> None:
        for update in engine.step():
            rec = in_flight.pop(update.request_id, None) if update.finished else None
            if rec is not None and update.output is not None:
                writer.write(result_record(rec, update.output))
                summary.done += 1
                summary.prompt_tokens += len(update.output.prompt_token_ids)
                summary.completion_tokens += len(update.output.token_ids)
                on_progress()

    def bad(line: BadLine) -> None:
        summary.failed += 1
        on_bad_line(line)
        on_progress()

    for rec in records:
        if isinstance(rec, BadLine):
            bad(rec)
            continue
        if rec.id in seen:
            bad(BadLine(rec.line, f"duplicate id {rec.id!r}"))
            continue
        seen.add(rec.id)
        if rec.id in writer.done_ids:
            summary.skipped += 1
            on_progress()
            continue
        try:
            p = dataclasses.replace(params, **rec.params) if rec.params else params
            prompt = rec.prompt if rec.messages is None else llm.chat_prompt(rec.messages)
            request_id = engine.add_request(prompt, p)
        except (PyBitNetError, TypeError) as e:
            bad(BadLine(rec.line, str(e)))
            continue
        in_flight[request_id] = rec
        while len(in_flight) >= 2 * engine.max_num_seqs:
            collect()
    while in_flight:
        collect()
    summary.seconds = time.perf_counter() - start
    return summary

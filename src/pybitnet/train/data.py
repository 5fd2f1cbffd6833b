"""Training data: files -> records -> (token ids, labels) -> fixed-length samples -> batches.

Readers stream every format (plain text by paragraph, JSON lines, CSV, Parquet row groups), so files larger
than memory work with `streaming`. Without it the samples are tokenized once into memory and shuffled each
epoch with a seeded permutation. Either way the position in the data is a small JSON-able state, so a resumed
run continues with exactly the next sample.

A sample is seq_len + 1 tokens: inputs are the first seq_len, next-token targets the last seq_len.
"""

from __future__ import annotations

import csv
import itertools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .tokenize import IGNORE_INDEX, TextTokenizer, tokenize_records

SUFFIX_FORMATS = {
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
PARQUET_BATCH_ROWS = 1024
TOKENIZE_CHUNK = 256  # records encoded per batch call


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"cannot tell the format of {path} from its suffix; name it .txt/.jsonl/.json/.csv/.parquet "
            "or set data_format"
        ) from None


def iter_records(path: Path, fmt: str = "auto", text_field: str = "text") -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; a record is a dict, or a DataError for a malformed one (so the caller can
    skip it and go on). The location is "file:line" (or "file:row N" for Parquet)."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    fmt = file_format(path, fmt)
    if fmt == "text":
        yield from _text_records(path, text_field)
    elif fmt == "csv":
        yield from _csv_records(path)
    elif fmt == "parquet":
        yield from _parquet_records(path)
    elif fmt == "json" and _starts_with_bracket(path):
        yield from _json_array_records(path)
    else:
        yield from _jsonl_records(path)


def _text_records(path: Path, text_field: str) -> Iterator[tuple[str, Any]]:
    """One record per paragraph (blank-line separated), newlines inside a paragraph kept."""
    lines: list[str] = []
    first = 0
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    first = first or n
                    lines.append(line)
                elif lines:
                    yield f"{path}:{first}", {text_field: "".join(lines).rstrip("\n")}
                    lines, first = [], 0
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text: {e}") from None
    if lines:
        yield f"{path}:{first}", {text_field: "".join(lines).rstrip("\n")}


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield f"{path}:{n}", DataError(f"not valid JSON: {e}")
                continue
            yield (
                f"{path}:{n}",
                record if isinstance(record, dict) else DataError("a record must be a JSON object"),
            )


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _json_array_records(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON file holding one array of records (read whole: use JSON lines for files larger than memory)."""
    try:
        records = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    for i, record in enumerate(records):
        yield (
            f"{path}:item {i}",
            record if isinstance(record, dict) else DataError("a record must be an object"),
        )


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row:
                    yield f"{path}:{reader.line_num}", DataError("row has more fields than the header")
                else:
                    yield f"{path}:{reader.line_num}", row
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{reader.line_num}: unreadable CSV: {e}") from None


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


class RecordStream:
    """Tokenized records of a list of files, in order, from a position (file index, records consumed)."""

    def __init__(self, files: list[Path], tok: TextTokenizer, fmt: str, text_field: str, on_bad: str) -> None:
        self.files, self.tok, self.fmt, self.text_field, self.on_bad = files, tok, fmt, text_field, on_bad
        self.skipped = 0

    def iter_from(
        self, file_idx: int = 0, record_idx: int = 0
    ) -> Iterator[tuple[int, int, list[int], list[int]]]:
        """(file index, records consumed in that file, ids, labels) of every good record from the position."""
        for fi in range(file_idx, len(self.files)):
            start = record_idx if fi == file_idx else 0
            records = itertools.islice(iter_records(self.files[fi], self.fmt, self.text_field), start, None)
            consumed = start
            while chunk := list(itertools.islice(records, TOKENIZE_CHUNK)):
                tokenized = tokenize_records([record for _, record in chunk], self.tok, self.text_field)
                for (where, _), result in zip(chunk, tokenized, strict=True):
                    consumed += 1
                    if (tokens := self._check(where, result)) is not None:
                        yield fi, consumed, *tokens

    def _check(
        self, where: str, result: tuple[list[int], list[int]] | DataError
    ) -> tuple[list[int], list[int]] | None:
        """The tokenized record; for a bad one, None (on_bad_record: skip) or a DataError naming where."""
        if not isinstance(result, DataError) and all(label == IGNORE_INDEX for label in result[1]):
            result = DataError("no token to train on (empty text or an empty completion)")
        if not isinstance(result, DataError):
            return result
        if self.on_bad == "fail":
            raise DataError(f"{where}: {result} (set on_bad_record: skip to skip malformed records)")
        self.skipped += 1
        warnings.warn(f"skipping malformed record at {where}: {result}", stacklevel=2)
        return None


class Packer:
    """Concatenates records into a stream and cuts windows of seq_len + 1 tokens at a stride of seq_len (each
    token but the first is a target once); without packing, a record is truncated or padded to one window."""

    def __init__(self, seq_len: int, packing: bool, pad_id: int) -> None:
        self.window, self.packing, self.pad_id = seq_len + 1, packing, pad_id
        self.ids: list[int] = []
        self.labels: list[int] = []

    def add(self, ids: list[int], labels: list[int]) -> list[tuple[list[int], list[int]]]:
        if not self.packing:
            ids, labels = ids[: self.window], labels[: self.window]
            pad = self.window - len(ids)
            return [(ids + [self.pad_id] * pad, labels + [IGNORE_INDEX] * pad)]
        self.ids += ids
        self.labels += labels
        out = []
        start, stride = 0, self.window - 1
        # cut at offsets: one copy of the buffer per record, not one per window
        while len(self.ids) - start >= self.window:
            out.append((self.ids[start : start + self.window], self.labels[start : start + self.window]))
            start += stride
        self.ids, self.labels = self.ids[start:], self.labels[start:]
        return out


class TokenDataset:
    """Samples for training: `next_batch(n)` returns ids and labels [n, seq_len + 1] (int64)."""

    def __init__(
        self,
        files: list[str | Path],
        tok: TextTokenizer,
        seq_len: int,
        *,
        fmt: str = "auto",
        text_field: str = "text",
        packing: bool = True,
        streaming: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        on_bad_record: str = "fail",
    ) -> None:
        paths = [Path(f) for f in files]
        for p in paths:
            if not p.is_file():
                raise DataError(f"data file {p} does not exist")
        self.records = RecordStream(paths, tok, fmt, text_field, on_bad_record)
        pad = tok.eos_id if tok.eos_id is not None else 0
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad
        self.streaming, self.shuffle, self.seed = streaming, shuffle and not streaming, seed
        self.epoch, self.index = 0, 0  # in memory: position in this epoch's order
        self.file_idx, self.record_idx = 0, 0  # streaming: position in the files
        self.packer = Packer(seq_len, packing, pad)
        self.pending: list[tuple[list[int], list[int]]] = []  # windows cut but not yet served
        self._records: Iterator | None = None
        self.samples: torch.Tensor | None = None
        self._order_cache: tuple[int, torch.Tensor] | None = None
        if not streaming:
            self.samples = self._tokenize_all()

    def _tokenize_all(self) -> torch.Tensor:
        packer = Packer(self.seq_len, self.packing, self.pad_id)
        rows = [s for *_, ids, labels in self.records.iter_from() for s in packer.add(ids, labels)]
        if not rows:
            raise DataError(
                f"the data yields no sample of {self.seq_len + 1} tokens; add data or lower seq_len"
            )
        return torch.tensor(rows, dtype=torch.int64)  # [N, 2, seq_len + 1]: ids, labels

    def __len__(self) -> int:
        if self.samples is None:
            raise TypeError("a streaming dataset has no length")
        return self.samples.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        """This epoch's sample order, drawn once per epoch (a permutation per sample would cost O(N) each)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.stack([self._next_sample() for _ in range(n)])
        return batch[:, 0], batch[:, 1]

    def _next_sample(self) -> torch.Tensor:
        if self.samples is not None:
            if self.index >= len(self):
                self.epoch, self.index = self.epoch + 1, 0
            sample = self.samples[self._order(self.epoch)[self.index]]
            self.index += 1
            return sample
        return self._next_streamed()

    def _next_streamed(self) -> torch.Tensor:
        records_this_pass = 0
        while not self.pending:
            if self._records is None:
                self._records = self.records.iter_from(self.file_idx, self.record_idx)
            item = next(self._records, None)
            if item is None:  # end of the files: the next epoch reads them again
                if records_this_pass == 0 and self.file_idx == 0 and self.record_idx == 0:
                    raise DataError(f"no usable record in {', '.join(map(str, self.records.files))}")
                self.epoch, self.file_idx, self.record_idx, self._records = self.epoch + 1, 0, 0, None
                records_this_pass = 0
                continue
            records_this_pass += 1
            self.file_idx, self.record_idx, ids, labels = item
            self.pending += self.packer.add(ids, labels)
        return torch.tensor(self.pending.pop(0))

    def iter_batches(self, n: int, max_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in file order (for validation), batches of up to n samples."""
        if self.samples is not None:
            for b, i in enumerate(range(0, len(self), n)):
                if max_batches and b >= max_batches:
                    return
                batch = self.samples[i : i + n]
                yield batch[:, 0], batch[:, 1]
            return
        packer, rows, b = Packer(self.seq_len, self.packing, self.pad_id), [], 0
        for *_, ids, labels in self.records.iter_from():
            rows += packer.add(ids, labels)
            while len(rows) >= n:
                if max_batches and b >= max_batches:
                    return
                batch, rows, b = torch.tensor(rows[:n]), rows[n:], b + 1
                yield batch[:, 0], batch[:, 1]
        if rows and not (max_batches and b >= max_batches):
            batch = torch.tensor(rows)
            yield batch[:, 0], batch[:, 1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "file_idx": self.file_idx,
            "record_idx": self.record_idx,
            "buffer_ids": list(self.packer.ids),
            "buffer_labels": list(self.packer.labels),
            "pending": [list(w) for w in self.pending],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.file_idx, self.record_idx = int(state["file_idx"]), int(state["record_idx"])
        self.packer.ids, self.packer.labels = list(state["buffer_ids"]), list(state["buffer_labels"])
        self.pending = [(list(ids), list(labels)) for ids, labels in state["pending"]]
        self._records = None

"""Training data: every file format, the TRL record formats and their loss masks, packing, streaming with an
exact resume position, and errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pybitnet.train import DataError, TextTokenizer, TokenDataset, tokenize_record
from pybitnet.train.tokenize import IGNORE_INDEX, tokenize_records
from test_train_support import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.from_dir(make_tokenizer(tmp_path_factory.mktemp("tok")))


def trained_text(tok: TextTokenizer, ids: list[int], labels: list[int]) -> str:
    return tok.tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])


def test_text_record_trains_on_everything_but_bos(tok):
    ids, labels = tokenize_record({"text": "Hello there."}, tok)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_prompt_completion_trains_on_the_completion_only(tok):
    ids, labels = tokenize_record({"prompt": "The sky is", "completion": " blue."}, tok)
    assert tok.tokenizer.decode(ids, skip_special_tokens=True) == "The sky is blue."
    assert trained_text(tok, ids, labels).startswith(" blue.")
    assert labels[-1] == tok.eos_id  # the model learns to stop


def test_messages_train_on_assistant_turns_with_their_end_of_turn(tok):
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello friend"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ]
    }
    ids, labels = tokenize_record(record, tok)
    assert tok.tokenizer.decode(ids, skip_special_tokens=False).startswith(
        "<|begin_of_text|>User: Hi<|eot_id|>"
    )
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert (
        tok.tokenizer.decode(trained, skip_special_tokens=False) == "Hello friend<|eot_id|>Goodbye<|eot_id|>"
    )


def test_conversational_prompt_completion(tok):
    record = {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    ids, labels = tokenize_record(record, tok)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.tokenizer.decode(trained, skip_special_tokens=False) == "4<|eot_id|>"


def write_all_formats(root: Path, records: list[dict]) -> dict[str, Path]:
    paths = {}
    paths["jsonl"] = root / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"] = root / "d.json"
    paths["json"].write_text(json.dumps(records))
    paths["csv"] = root / "d.csv"
    paths["csv"].write_text("text\n" + "".join('"' + r["text"].replace('"', '""') + '"\n' for r in records))
    paths["parquet"] = root / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"], row_group_size=3)
    paths["text"] = root / "d.txt"
    paths["text"].write_text("\n\n".join(r["text"] for r in records) + "\n")
    return paths


def test_batched_tokenization_equals_one_record_at_a_time(tok):
    """Plain-text records go through one encode_batch call; the results and the errors must be those of
    tokenize_record on each record, in order, whatever kinds are mixed."""
    records = [
        {"text": "Hello there."},
        {"prompt": "The sky is", "completion": " blue."},
        {"text": 3},  # not a string
        {"text": "A second text, longer than the first one."},
        {"nothing": "here"},
        DataError("line 9: not JSON"),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"text": ""},
    ]
    batched = tokenize_records(records, tok)
    assert len(batched) == len(records)
    for record, got in zip(records, batched, strict=True):
        if isinstance(record, DataError):
            assert got is record
            continue
        try:
            want = tokenize_record(record, tok)
        except DataError as e:
            assert isinstance(got, DataError) and str(got) == str(e)
        else:
            assert got == want


def test_every_file_format_gives_the_same_samples(tok, tmp_path):
    records = [{"text": f"Record number {i} says hello, world."} for i in range(10)]
    paths = write_all_formats(tmp_path, records)
    samples = {fmt: TokenDataset([p], tok, 16, shuffle=False).samples for fmt, p in paths.items()}
    for fmt, s in samples.items():
        assert torch.equal(s, samples["jsonl"]), fmt


def test_packing_windows_overlap_by_one_token_and_unpacked_rows_are_padded(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"Short text {i}."}) + "\n" for i in range(20)))
    packed = TokenDataset([path], tok, 8, shuffle=False).samples
    assert torch.equal(packed[0, 0, -1], packed[1, 0, 0])
    rows = TokenDataset([path], tok, 24, packing=False, shuffle=False).samples
    assert rows.shape == (20, 2, 25)
    ids, _ = tokenize_record({"text": "Short text 0."}, tok)
    assert len(ids) < 25
    assert rows[0, 0, : len(ids)].tolist() == ids
    assert (rows[0, 1, len(ids) :] == IGNORE_INDEX).all()


def test_streaming_reads_the_same_samples_and_resumes_exactly(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"Line {i} of a stream of records."}) + "\n" for i in range(30))
    )
    in_memory = TokenDataset([path], tok, 8, shuffle=False)
    stream = TokenDataset([path], tok, 8, streaming=True)
    n = len(in_memory)
    first_ids, _ = stream.next_batch(5)
    assert torch.equal(first_ids, in_memory.samples[:5, 0])
    state = json.loads(json.dumps(stream.state_dict()))
    expected, _ = stream.next_batch(n)  # runs past the end into epoch 2
    resumed = TokenDataset([path], tok, 8, streaming=True)
    resumed.load_state_dict(state)
    got, _ = resumed.next_batch(n)
    assert torch.equal(got, expected)
    assert resumed.epoch == 1


def test_in_memory_shuffle_is_seeded_and_resumable(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"Record {i} with a few words."}) + "\n" for i in range(40)))
    a = TokenDataset([path], tok, 8, seed=3)
    a.next_batch(7)
    state = a.state_dict()
    rest, _ = a.next_batch(len(a))
    b = TokenDataset([path], tok, 8, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(len(b))[0], rest)
    c = TokenDataset([path], tok, 8, seed=4)
    assert not torch.equal(
        c.next_batch(len(c))[0], TokenDataset([path], tok, 8, seed=3).next_batch(len(c))[0]
    )


def test_malformed_records_fail_naming_file_and_line_or_are_skipped(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "fine"}\n{"text": broken\n{"txt": "wrong field"}\n[1, 2]\n{"text": "also fine"}\n'
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        TokenDataset([path], tok, 4)
    with pytest.warns(UserWarning, match="skipping malformed record"):
        ds = TokenDataset([path], tok, 4, on_bad_record="skip")
    assert ds.records.skipped == 3
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('text\n"ok"\n"a","b"\n')
    with pytest.raises(DataError, match=r"bad\.csv:3: row has more fields"):
        TokenDataset([csv_path], tok, 4)
    messages = tmp_path / "chat.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl:1: conversation has no assistant message"):
        TokenDataset([messages], tok, 4)


def test_missing_files_too_little_data_and_unknown_suffix(tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TokenDataset([tmp_path / "nope.jsonl"], tok, 8)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(DataError, match="lower seq_len"):
        TokenDataset([short], tok, 64)
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(DataError, match="data_format"):
        TokenDataset([odd], tok, 8)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        TokenDataset([bad_parquet], tok, 8)

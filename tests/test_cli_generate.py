"""`pybitnet generate`: files in (.txt/.jsonl/.csv) and out (.jsonl/.json/.csv), resume, malformed lines."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from pybitnet import SamplingParams
from test_engine_helpers import cli_app, cli_model_args, tiny_llm

FLAGS = ["-n", "6", "--temp", "0", "--ignore-eos", "-np", "3"]
PROMPTS = ["The sky is", "Once upon a time", "Numbers: 1, 2,", "Hello", "A cat"]


def expected(prompt: str | list, **kw) -> str:
    p = SamplingParams(max_tokens=6, temperature=0, top_k=40, top_p=0.95, min_p=0.05, ignore_eos=True, **kw)
    llm = tiny_llm()
    return llm.chat(prompt, p)[0].text if isinstance(prompt, list) else llm.generate(prompt, p)[0].text


def run(args: list[str]):
    return CliRunner().invoke(cli_app(), ["generate", *cli_model_args(), *FLAGS, *args])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_txt_to_jsonl(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(PROMPTS[:3]) + "\n\n" + PROMPTS[3] + "\n")
    result = run(["--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert set(records) == {"1", "2", "3", "5"}  # ids are line numbers; the blank line 4 is skipped
    for rid, prompt in zip(["1", "2", "3", "5"], PROMPTS[:4], strict=True):
        r = records[rid]
        assert r["prompt"] == prompt and r["text"] == expected(prompt)
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 6 and r["prompt_tokens"] > 0
    assert "4 generated, 0 already done, 0 malformed" in result.stderr
    assert "generating" in result.stderr  # the progress bar


def test_jsonl_with_chats_params_and_malformed_lines(tmp_path):
    chat = [{"role": "user", "content": "Hi!"}]
    lines = [
        json.dumps({"id": "a", "prompt": PROMPTS[0]}),
        json.dumps({"id": "b", "messages": chat}),
        "{not json",
        json.dumps({"id": "c", "prompt": PROMPTS[1], "max_tokens": 3}),
        json.dumps({"id": "d"}),
        json.dumps({"id": "e", "prompt": PROMPTS[2], "temperature": -1}),
        json.dumps({"id": "a", "prompt": "duplicate id"}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "f", "prompt": ""}),
        json.dumps({"id": "g", "prompt": PROMPTS[3]}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = run(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 1  # some lines were malformed, the rest ran
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert set(records) == {"a", "b", "c", "g"}
    assert records["a"]["text"] == expected(PROMPTS[0])
    assert records["b"]["text"] == expected(chat) and records["b"]["prompt"] == chat
    assert records["c"]["completion_tokens"] == 3
    err = " ".join(result.stderr.split())
    fragments = [
        "in.jsonl:3: invalid JSON",
        'in.jsonl:5: needs exactly one of "prompt"',
        "in.jsonl:6: temperature",
        "in.jsonl:7: duplicate id 'a'",
        "in.jsonl:8: expected a JSON object",
        "in.jsonl:9: the prompt is empty",
        "4 generated, 0 already done, 6 malformed",
    ]
    for fragment in fragments:
        assert fragment in err, fragment


def test_csv_to_csv_and_json(tmp_path):
    with (tmp_path / "in.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "note"])
        w.writerow(["x1", PROMPTS[0], "n"])
        w.writerow(["x2", "multi\nline, with comma", ""])
        w.writerow(["x3"])
    result = run(["--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")])
    assert result.exit_code == 1 and "in.csv:5:" in result.stderr
    rows = list(csv.DictReader((tmp_path / "out.csv").open(newline="")))
    assert {r["id"]: r["text"] for r in rows} == {
        "x1": expected(PROMPTS[0]),
        "x2": expected("multi\nline, with comma"),
    }
    result = run(["--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.json")])
    data = json.loads((tmp_path / "out.json").read_text())
    assert sorted(r["id"] for r in data) == ["x1", "x2"]


def test_resume_skips_ids_already_done(tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    done = {"id": "2", "prompt": PROMPTS[1], "text": "KEEP", "finish_reason": "length"}
    # a previous run finished id 2, then stopped in the middle of writing id 4
    out.write_text(json.dumps(done) + "\n" + '{"id": "4", "prompt": "He')
    result = run(["--input", str(tmp_path / "in.txt"), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 generated, 1 already done, 0 malformed" in result.stderr
    records = [
        json.loads(line)
        for line in out.read_text().splitlines()
        if line.startswith('{"id": "') and line.endswith("}")
    ]
    ids = sorted(r["id"] for r in records)
    assert ids == ["1", "2", "3", "4", "5"]
    assert next(r for r in records if r["id"] == "2")["text"] == "KEEP"
    again = run(["--input", str(tmp_path / "in.txt"), "--output", str(out)])
    assert "0 generated, 5 already done" in again.stderr
    fresh = run(["--input", str(tmp_path / "in.txt"), "--output", str(out), "--overwrite"])
    assert "5 generated, 0 already done" in fresh.stderr
    assert len(read_jsonl(out)) == 5


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--input", "{d}/missing.txt", "--output", "{d}/o.jsonl"], "does not exist"),
        ("x", ["--input", "{d}/in.xml", "--output", "{d}/o.jsonl"], "unknown input file kind '.xml'"),
        ("x", ["--input", "{d}/in.txt", "--output", "{d}/o.parquet"], "unknown output file kind"),
        (b"\xff\xfe\x00bad", ["--input", "{d}/in.txt", "--output", "{d}/o.jsonl"], "not UTF-8"),
        ("x", ["--input", "{d}/in.txt", "--output", "{d}/bad.json"], "not valid JSON"),
    ],
)
def test_unusable_files_give_clear_errors(tmp_path, setup, args, message):
    if setup is not None:
        for name in ("in.txt", "in.xml"):
            data = setup if isinstance(setup, bytes) else setup.encode()
            (tmp_path / name).write_bytes(data)
    (tmp_path / "bad.json").write_text("[{")
    result = run([a.format(d=tmp_path) for a in args])
    assert result.exit_code == 1 and message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output

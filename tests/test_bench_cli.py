"""`pybitnet bench`: the llama-bench-style table, CSV and JSON outputs, on a tiny random model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pybitnet.cli.app import _register_verbs, app

_register_verbs()
runner = CliRunner()


def bench(*args: str):
    return runner.invoke(app, ["bench", "--preset", "tiny-bitnet", "-p", "16", "-n", "4", "-r", "2", *args])


def test_markdown_table():
    result = bench()
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s |"
    assert any("| pp16 |" in line for line in lines) and any("| tg4 |" in line for line in lines)
    assert "±" in result.output and "peak RSS" in result.output


def test_json_and_csv_with_thread_list():
    result = bench("-o", "json", "-t", "1,2", "--kernel", "reference")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["threads"], r["test"]) for r in rows] == [(1, "pp16"), (1, "tg4"), (2, "pp16"), (2, "tg4")]
    assert all(r["ts_mean"] > 0 and len(r["samples"]) == 2 and r["peak_rss_bytes"] > 0 for r in rows)
    assert rows[0]["backend"] == "reference, float head"
    csv = bench("-o", "csv", "-n", "0")
    assert csv.exit_code == 0, csv.output
    header, row = csv.output.splitlines()
    assert header.startswith("model,size_bytes,params,backend,threads,test,ts_mean,ts_sd")
    assert ",pp16," in row


@pytest.mark.parametrize("args", [["-o", "xml"], ["-p", "0", "-n", "0"], ["-p", "x"]])
def test_bad_arguments(args):
    assert bench(*args).exit_code != 0


def test_model_and_preset_exclusive():
    assert runner.invoke(app, ["bench", "org/model", "--preset", "tiny-bitnet"]).exit_code != 0


def test_bad_head_mode_and_missing_model_are_user_errors():
    result = bench("--lm-head", "int5")
    assert result.exit_code == 2 and "--lm-head must be one of" in result.output
    missing = runner.invoke(app, ["bench", "/nonexistent/model", "-p", "8", "-n", "0", "-r", "1"])
    assert missing.exit_code == 1 and "neither an existing path" in missing.output
    assert missing.exception is None or isinstance(missing.exception, SystemExit)


def test_read_bandwidth_reads_both_kinds_of_memory(monkeypatch):
    """The efficiency denominator: the best of the read loop over ordinary and huge-page buffers of nbytes."""
    from pybitnet import bench as bench_module
    from pybitnet.kernels import cpu

    if not cpu.native_available():
        pytest.skip("the C kernels are not built")
    native, seen = cpu._native, []

    class Recording:
        def __getattr__(self, name):
            return getattr(native, name)

        def read_bandwidth(self, ptr, nbytes, reps):
            seen.append(nbytes)
            return native.read_bandwidth(ptr, nbytes, reps)

    monkeypatch.setattr(cpu, "_native", Recording())
    gbps = bench_module.read_bandwidth(1, nbytes=1 << 22)
    assert seen == [1 << 22, 1 << 22] and 0 < gbps < 1e4

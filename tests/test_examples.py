"""The scripts in examples/ run as a user would run them, offline, and print what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_generate_example_completes_and_streams():
    out = _run("generate.py")
    assert out.count("--- length, 32 tokens") == 2 and "def fibonacci(n):" in out and "class Stack:" in out
    assert out.split("--- streamed, greedy\n")[1].strip()  # the deltas of the streamed completion


def test_convert_example_ends_ternary_near_its_full_precision_loss():
    pytest.importorskip("transformers")
    out = _run("convert_to_ternary.py", "--steps", "30")
    fp = float(out.split("full precision: loss ")[1].split()[0])
    final = float(out.split("ternary: loss ")[1].split()[0])
    assert "λ 1.00" in out and final < max(2 * fp, 0.5)  # a random model starts near 5.5

"""The model shipped in the package: it loads offline, is small and ternary, and every verb uses it when no
model is named (`pybitnet run "def fibonacci(n):"`, as the README's first command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pybitnet import LLM, SamplingParams
from pybitnet.engine import default_model as dm
from pybitnet.errors import ModelNotFoundError
from test_engine_helpers import cli_app

MAX_BYTES = 15 * 1000 * 1000
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def model_dir():
    path = dm.default_model()
    assert path is not None, "the package data src/pybitnet/default_model is missing"
    return path


def test_shipped_files_are_complete_and_small(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert name in names
    assert sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()) <= MAX_BYTES


def test_checkpoint_is_packed_ternary(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "bitnet" and config["hidden_act"] == "relu2"
    assert config["quantization_config"]["quant_method"] == "bitnet"
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = f.keys()
        linears = [n for n in names if n.endswith("proj.weight")]
        assert len(linears) == 7 * config["num_hidden_layers"]
        for name in linears:
            w = f.get_tensor(name)
            assert w.dtype == torch.uint8, name  # four 2-bit codes a byte
            pairs = torch.stack([(w >> s) & 3 for s in (0, 2, 4, 6)])
            assert int(pairs.max()) <= 2, name  # codes 0, 1, 2 are -1, 0, +1; 3 is unused
            assert f.get_tensor(name + "_scale").numel() == 1


def test_loads_offline_and_completes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = LLM(device="cpu")
    out = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert len(out.token_ids) > 0 and out.text.strip()


def test_cli_run_uses_the_default_model_for_a_lone_prompt(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli_app(), ["run", PROMPT, "-n", "16", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_readme_command_in_a_subprocess(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-c", "from pybitnet.cli.app import main; main()", "run", PROMPT, "-n", "16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.parametrize(
    ("text", "is_model"),
    [
        ("def fibonacci(n):", False),
        ("hello", False),
        ("microsoft/bitnet-b1.58-2B-4T", True),
        ("/no/such/dir", True),
        ("./model", True),
        ("model.gguf", True),
    ],
)
def test_a_lone_argument_is_a_model_or_a_prompt(text, is_model):
    assert dm.names_a_model(text) is is_model
    assert dm.split_model_and_prompt(text, None) == ((text, None) if is_model else (None, text))
    assert dm.split_model_and_prompt(text, "hi") == (text, "hi")


def test_missing_default_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dm, "default_model", lambda: None)
    with pytest.raises(ModelNotFoundError, match="no model given"):
        dm.model_or_default(None)
    assert dm.split_model_and_prompt("hello", None) == ("hello", None)


def test_chat_bench_and_serve_use_the_default_model(monkeypatch):
    """Without MODEL, chat, bench and serve run the shipped model too (run: tests above)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    chat = CliRunner().invoke(cli_app(), ["chat", "-n", "8", "-s", "0"], input="import os\n/exit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.replace(">>>", "").strip()

    bench = CliRunner().invoke(cli_app(), ["bench", "-p", "8", "-n", "2", "-r", "1", "-o", "json"])
    assert bench.exit_code == 0, bench.output
    (row, *_) = json.loads(bench.stdout)
    assert row["model"] == str(dm.default_model())

    import pybitnet.server as server_module

    seen = {}

    class FakeServer:  # stands in for uvicorn: loads the model as the real server's startup does
        class state:
            error = None

        def __init__(self, load, settings, *args):
            seen["settings"], seen["load"] = settings, load

        def run(self):
            seen["llm"] = seen["load"]()

    monkeypatch.setattr(server_module, "build_server", FakeServer)
    serve = CliRunner().invoke(cli_app(), ["serve", "--port", "0"])
    assert serve.exit_code == 0, serve.output
    assert seen["settings"].model_name == "default"
    assert str(seen["llm"].model_path) == str(dm.default_model())

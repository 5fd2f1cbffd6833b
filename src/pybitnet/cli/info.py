"""`pybitnet info MODEL`: architecture, parameters, layout and bytes of a model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

ModelArg = Annotated[str, typer.Argument(help="Hub id (org/name), local model directory or .gguf file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of a table.")]


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(model: ModelArg, as_json: JsonOpt = False) -> None:
    """Print a model's architecture, parameter counts, weight layout and bytes (weights are not loaded)."""
    from ..api import summarize_model
    from ..errors import PyBitNetError

    try:
        summary = summarize_model(model)
    except PyBitNetError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(_json(summary))
    else:
        Console(highlight=False).print(_table(model, summary))


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _table(model: str, s) -> Table:
    c = s.config
    table = Table(title=escape(model), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    eos = c.eos_token_id if not isinstance(c.eos_token_id, list) else ", ".join(map(str, c.eos_token_id))
    rows = [
        ("path", str(s.path)),
        ("format", s.file_format),
        ("architecture", f"{s.architecture} (family {c.family}: {_family_note(c)})"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden size", str(c.hidden_size)),
        ("intermediate size", str(c.intermediate_size)),
        (
            "attention heads",
            f"{c.num_attention_heads} query, {c.num_key_value_heads} key/value, head dim {c.head_dim}",
        ),
        ("vocabulary", f"{c.vocab_size:,} (bos {c.bos_token_id}, eos {eos})"),
        ("context", f"{c.max_position_embeddings:,} tokens, RoPE theta {c.rope_theta:g}"),
        ("embeddings", "tied (lm_head = embed_tokens)" if c.tie_word_embeddings else "untied"),
        ("parameters", _count(s.ternary_params + s.float_params)),
        ("  ternary", _count(s.ternary_params)),
        ("  float", _count(s.float_params)),
        ("weight layout", s.layout),
    ]
    bpw = s.ternary_bits_per_weight
    if bpw is not None:
        rows.append(("  bits per ternary weight", f"{bpw:.4g}"))
    rows.append(("bytes on disk", _bytes(s.total_bytes)))
    rows.append(("  weights", _bytes(s.weight_bytes)))
    for kind, n in sorted(s.tensor_bytes.items()):
        rows.append((f"  {kind} tensors", _bytes(n)))
    for field, value in rows:
        table.add_row(field, escape(value))
    return table


def _family_note(c) -> str:
    act = "relu²" if c.hidden_act == "relu2" else c.hidden_act
    norms = "sub-norms" if c.sub_norms else "no sub-norms"
    return f"{act}, {norms}"


def _json(s) -> str:
    import json

    return json.dumps(
        {
            "path": str(s.path),
            "format": s.file_format,
            "architecture": s.architecture,
            "family": s.config.family,
            "config": {k: v for k, v in s.config.to_dict().items() if k != "extra"},
            "ternary_params": s.ternary_params,
            "float_params": s.float_params,
            "layout": s.layout,
            "bits_per_ternary_weight": s.ternary_bits_per_weight,
            "total_bytes": s.total_bytes,
            "weight_bytes": s.weight_bytes,
            "tensor_bytes": s.tensor_bytes,
            "files": s.files,
        },
        indent=2,
    )

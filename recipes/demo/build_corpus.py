"""Build the default model's corpus and tokenizer: Python sources every pybitnet install already has.

    python recipes/demo/build_corpus.py [--stdlib DIR] [--packages NAME ...] [--out DIR]

The corpus is every `.py` file of the standard library that ships with CPython (Python Software Foundation
License) and of the installed packages named by --packages: the shipped model (recipes/demo.yaml) adds torch
(BSD-3-Clause), its dependencies sympy and networkx (BSD-3-Clause), which `pip install torch` brings along,
and numpy (BSD-3-Clause); the CPU-sized recipes/demo-cpu.yaml uses the library alone. Left out: the library's
site-packages, test suites, codec tables, generated data modules and files over MAX_FILE_BYTES (generated
tables). Each file is one JSON-lines record {"text": source}. A file goes to validation when the SHA-256
of its path (relative to the library, or `<package>/...`) falls in the first 3 of 100 buckets, so the split
is the same on every machine. A Llama-3-style byte-level BPE (the `tokenizers` trainer) is trained on the
training files only and written with a completion template to `<out>/tokenizer`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import sysconfig
from pathlib import Path

from pybitnet.models.dummy import build_tokenizer, write_tokenizer_files
from pybitnet.models.presets import preset

VOCAB_SIZE = 4096
BOS_ID, EOS_ID = 1, 2
VAL_BUCKETS = 3  # of 100: about 3% of the files are held out
EXCLUDED_DIRS = {"site-packages", "test", "tests", "testing", "idle_test", "encodings", "pydoc_data"}
EXCLUDED_DIRS |= {"__pycache__"}
MAX_FILE_BYTES = 400_000
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")
# The conversation is the document: BOS, then the turns joined by newlines (as training records begin), so
# `run`, `chat` and the server's chat endpoint continue the user's code instead of wrapping it in role markup
# the model never saw.
COMPLETION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)


def source_files(root: Path) -> list[Path]:
    """The .py files under `root`, relative to it, in a fixed order."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith(EXCLUDED_PREFIXES):
            continue
        if path.stat().st_size <= MAX_FILE_BYTES:
            files.append(rel)
    return files


def package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: install it or leave it out of --packages")
    return Path(next(iter(spec.submodule_search_locations)))


def is_validation(rel: Path) -> bool:
    return int(hashlib.sha256(rel.as_posix().encode()).hexdigest(), 16) % 100 < VAL_BUCKETS


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="the library's directory")
    ap.add_argument("--packages", nargs="*", default=[], help="installed packages to add to the library")
    ap.add_argument("--out", default="out/demo-data")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roots = {"stdlib": Path(args.stdlib)} | {name: package_root(name) for name in args.packages}
    versions = {"python": platform.python_version()}
    versions |= {name: importlib.metadata.version(name) for name in args.packages}
    train, val = [], []
    for prefix, root in roots.items():
        for rel in source_files(root):
            text = (root / rel).read_text(encoding="utf-8", errors="replace").strip()
            name = rel if prefix == "stdlib" else Path(prefix) / rel  # library names as the shipped split
            if text:
                (val if is_validation(name) else train).append((name, text))
    write_jsonl(out / "train.jsonl", [t for _, t in train])
    write_jsonl(out / "val.jsonl", [t for _, t in val])
    (out / "val_files.txt").write_text("".join(f"{rel.as_posix()}\n" for rel, _ in val), encoding="utf-8")

    config = preset("tiny-bitnet", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    tok = build_tokenizer(VOCAB_SIZE, BOS_ID, EOS_ID, text="\n".join(t for _, t in train))
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    write_tokenizer_files(tok, config, tok_dir)
    cfg_file = tok_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    tok_cfg["chat_template"] = COMPLETION_TEMPLATE
    cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sizes = {name: sum(len(t) for _, t in part) for name, part in (("train", train), ("val", val))}
    print(
        json.dumps(
            {"versions": versions, "train_files": len(train), "val_files": len(val), "chars": sizes},
            indent=None,
        )
    )


if __name__ == "__main__":
    main()

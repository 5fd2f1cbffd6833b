"""Build the default model's corpus and tokenizer: the Python standard library's own sources.

    python recipes/demo/build_corpus.py [--stdlib DIR] [--out out/demo-data]

The corpus is every `.py` file of the standard library that ships with CPython (Python Software Foundation
License; CPython's LICENSE file lies next to the sources), except site-packages, the test suites, the codec
tables and generated data modules. Each file is one JSON-lines record {"text": source}. A file goes to
validation when the SHA-256 of its path relative to the library directory falls in the first 3 of 100 buckets,
so the split is the same on every machine and Python patch release. A Llama-3-style byte-level BPE (the
`tokenizers` trainer) is trained on the training files only and written with a completion template to
`<out>/tokenizer`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
from pathlib import Path

from pybitnet.models.dummy import build_tokenizer, write_tokenizer_files
from pybitnet.models.presets import preset

VOCAB_SIZE = 4096
BOS_ID, EOS_ID = 1, 2
VAL_BUCKETS = 3  # of 100: about 3% of the files are held out
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")
# The conversation is the document: BOS, then the turns joined by newlines (as training records begin), so
# `run`, `chat` and the server's chat endpoint continue the user's code instead of wrapping it in role markup
# the model never saw.
COMPLETION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)


def stdlib_files(root: Path) -> list[Path]:
    """The library's .py files, relative to `root`, in a fixed order."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith(EXCLUDED_PREFIXES):
            continue
        files.append(rel)
    return files


def is_validation(rel: Path) -> bool:
    return int(hashlib.sha256(rel.as_posix().encode()).hexdigest(), 16) % 100 < VAL_BUCKETS


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="the library's directory")
    ap.add_argument("--out", default="out/demo-data")
    args = ap.parse_args()
    root, out = Path(args.stdlib), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = [], []
    for rel in stdlib_files(root):
        text = (root / rel).read_text(encoding="utf-8", errors="replace").strip()
        if text:
            (val if is_validation(rel) else train).append((rel, text))
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
            {"stdlib": str(root), "train_files": len(train), "val_files": len(val), "chars": sizes},
            indent=None,
        )
    )


if __name__ == "__main__":
    main()

"""The tokenizer of a GGUF file, from a HF tokenizer.json (byte-level BPE: GPT-2 / Llama 3 style).

Token list and types are built here (as llama.cpp's converter does from the same files); merges, special token
ids, add_bos and the chat template come from the gguf package's SpecialVocab, which reads tokenizer.json,
tokenizer_config.json, chat_template.jinja and config.json exactly as llama.cpp's converter does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from ..errors import ConfigError, UnsupportedModelError
from .config_json import read_json

# Llama 3's pre-tokenizer split; llama.cpp names this pre-tokenizer "llama-bpe".
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# End-of-turn tokens of common chat formats, for tokenizer.ggml.eot_token_id.
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


def _pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer: a Llama 3 regex split -> "llama-bpe", GPT-2's own ByteLevel
    regex -> "gpt-2", else "default" (llama.cpp's generic byte-level split)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
            return "llama-bpe"
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    return "default"


def _token_table(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1; ids the tokenizer leaves free become [PADn]."""
    model = tokenizer.get("model") or {}
    by_id: dict[int, tuple[str, int]] = {
        i: (t, TokenType.NORMAL) for t, i in (model.get("vocab") or {}).items()
    }
    for added in tokenizer.get("added_tokens") or []:
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(
            f"the tokenizer has token id {max(by_id)}, but the model's embedding has only {vocab_size} rows"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.USER_DEFINED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def add_tokenizer(writer: GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer.ggml.* keys and tokenizer.chat_template for the tokenizer in `tokenizer_dir`."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{tokenizer_dir} has no tokenizer.json; a GGUF file carries its tokenizer, so export needs one"
        )
    tokenizer = read_json(path, "tokenizer")
    model = tokenizer.get("model") or {}
    decoder = tokenizer.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UnsupportedModelError(
            f"{path}: GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama 3 style); this one has "
            f"model type {model.get('type')!r}, byte_fallback {bool(model.get('byte_fallback'))}, "
            f"decoder {decoder.get('type')!r}"
        )
    tokens, types = _token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # its guesses about pair templates (add_sep) are noise for causal LMs
    try:
        special = SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    if not special.merges:
        raise ConfigError(f"{path} has no BPE merges; llama.cpp cannot tokenize without them")
    special.add_to_gguf(writer, quiet=True)
    eot = next((tokens.index(t) for t in EOT_TOKENS if t in tokens), None)
    if eot is not None and "eot" not in special.special_token_ids:
        writer.add_eot_token_id(eot)

"""The tokenizer a GGUF file carries in its metadata (tokenizer.ggml.*), rebuilt as a `tokenizers` tokenizer.

Byte-level BPE ("gpt2" in GGUF: GPT-2 / Llama 3 style) is supported: the token list, merges and token types
give the vocabulary, the special (control) tokens and the added tokens; tokenizer.ggml.pre names the
pre-tokenizer split; add_bos_token decides whether encoding prepends BOS; tokenizer.chat_template is the
chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as FastTokenizer

from ..errors import TokenizerError
from ..formats.gguf_tokenizer import LLAMA3_SPLIT
from .tokenizer import Tokenizer

# GGUF token types (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> the split regex before byte-level encoding (llama.cpp's pre-tokenizer names)
SPLITS = {
    "llama-bpe": LLAMA3_SPLIT,
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
SPLITS["default"] = SPLITS["gpt-2"]


def _get(
    meta: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, default: Any = None
) -> Any:
    value = meta.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise TokenizerError(f"{path}: metadata {key!r} has the wrong type ({type(value).__name__})")
    return value


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    from ..formats.gguf_file import GGUFFile

    path = Path(path)
    meta = GGUFFile(path).metadata
    kind = _get(meta, "tokenizer.ggml.model", str, path)
    if kind is None:
        raise TokenizerError(
            f"{path} carries no tokenizer (no tokenizer.ggml.* metadata); pass tokenizer=DIR"
        )
    if kind != "gpt2":
        raise TokenizerError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' is); "
            "pass tokenizer=DIR with the model's tokenizer.json"
        )
    tokens = _get(meta, "tokenizer.ggml.tokens", list, path) or []
    types = _get(meta, "tokenizer.ggml.token_type", list, path) or [1] * len(tokens)
    merges = _get(meta, "tokenizer.ggml.merges", list, path) or []
    if not tokens or len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens / token_type are missing or inconsistent")
    pre = _get(meta, "tokenizer.ggml.pre", str, path, "default")
    if pre not in SPLITS:
        raise TokenizerError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(SPLITS)} are)")

    added = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges if isinstance(m, str) and " " in m]
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # special and user-defined tokens are in the vocabulary already; adding them keeps their ids
    for i in sorted(added):
        token = AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
        if types[i] == CONTROL:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        if tok.token_to_id(tokens[i]) != i:
            raise TokenizerError(f"{path}: added token {tokens[i]!r} does not keep its id {i}")

    def token(key: str) -> tuple[int | None, str | None]:
        i = _get(meta, f"tokenizer.ggml.{key}_token_id", int, path)
        return (i, tokens[i]) if i is not None and 0 <= i < len(tokens) else (None, None)

    (bos_id, bos), (_, eos) = token("bos"), token("eos")
    steps: list = [processors.ByteLevel(trim_offsets=False)]
    if _get(meta, "tokenizer.ggml.add_bos_token", bool, path, False) and bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos}:0 $A:0", special_tokens=[(bos, bos_id)]))
    tok.post_processor = processors.Sequence(steps)
    specials = {name: text for name, text in (("bos_token", bos), ("eos_token", eos)) if text is not None}
    stops = [i for i, _ in (token("eos"), token("eot"), token("eom")) if i is not None]
    template = _get(meta, "tokenizer.chat_template", str, path)
    return Tokenizer(tok, specials, template, stops)

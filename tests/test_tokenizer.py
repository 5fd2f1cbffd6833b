"""Tokenizer loading (as AutoTokenizer loads it), stop ids, incremental detokenization, stop strings."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from pybitnet.engine import Tokenizer
from pybitnet.engine.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from pybitnet.errors import TokenizerError
from test_engine_helpers import model_dir

TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "héllo wörld — naïve café",
    "日本語のテキスト and emoji 🙂👍🏽 mixed",
    "line one\nline two\r\n\ttabbed",
    "special <|eot_id|> inside <|begin_of_text|> text",
    "numbers 3.14159 and 1234567890",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(model_dir())


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir()))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text).input_ids
    assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False).input_ids
    ids = hf_tok(text).input_ids
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_stop_ids(tok, hf_tok):
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_id == hf_tok.eos_token_id == 2
    eot = tok.encode("<|eot_id|>", add_special_tokens=False)
    assert len(eot) == 1
    # EOS from the tokenizer, EOS + EOT from generation_config.json
    assert tok.stop_token_ids == {2, eot[0]}
    assert tok.special_tokens["bos_token"] == "<|begin_of_text|>"


def test_end_of_turn_token_stops_even_if_no_config_lists_it(tmp_path):
    shutil.copytree(model_dir(), tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path / "m")
    assert tok.stop_token_ids == {2, tok.encode("<|eot_id|>", add_special_tokens=False)[0]}


def test_missing_or_corrupt_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(model_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def _stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_never_splits_a_character(tok, text):
    prompt = tok.encode("Once upon a time")
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, prompt, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)
    multibyte = [c for c in text if len(c.encode()) > 1]
    if multibyte:  # byte-level tokens split these characters, so some tokens must have produced no text
        assert any(d == "" for d in deltas[:-1])


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    deltas = _stream(tok, [], ids[:-1])
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] and set(deltas[-1]) == {"\ufffd"}


def _sentencepiece_style_tokenizer(tmp_path) -> Tokenizer:
    """A Llama-2-style tokenizer: '▁' word marks, byte fallback, a decoder that strips the first space."""
    from pybitnet.models.dummy import TRAINING_TEXT

    trainer_tok = FastTokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer_tok.train_from_iterator(
        TRAINING_TEXT.splitlines(),
        trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<s>", "</s>"]),
    )
    model = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=None))
    tok.normalizer = trainer_tok.normalizer
    tok.pre_tokenizer = trainer_tok.pre_tokenizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer.from_dir(tmp_path)


def test_incremental_detokenization_keeps_leading_spaces_of_sentencepiece_tokens(tmp_path):
    tok = _sentencepiece_style_tokenizer(tmp_path)
    prompt = tok.encode("The weather is")
    ids = tok.encode("nice today, café ☕ 日本", add_special_tokens=False)  # "▁nice ..."
    assert tok.decode(ids).startswith("nice")  # alone, the decoder strips the first space
    assert any(tok.token_text(i).startswith("<0x") or len(tok.token_text(i)) == 1 for i in ids)
    deltas = _stream(tok, prompt, ids)
    assert all("\ufffd" not in d for d in deltas)
    # the reply continues the prompt: its first word keeps its space, as when decoding prompt + reply together
    full = tok.decode(prompt + ids)
    assert "".join(deltas) == full[len(tok.decode(prompt)) :]
    assert "".join(deltas).startswith(" nice")


def test_find_stop_and_partial_stop_len():
    assert find_stop("hello world###rest", ["###"], 11) == (11, "###")
    assert find_stop("hello wo", ["world"], 5) is None
    assert find_stop("ab STOP cd END", ["END", "STOP"], 0) == (3, "STOP")
    # a stop completed by a delta that starts inside it is found
    assert find_stop("xx#", ["##"], 2) is None
    assert find_stop("xx##", ["##"], 3) == (2, "##")
    assert partial_stop_len("hello wor", ["world"]) == 3
    assert partial_stop_len("hello", ["world"]) == 0
    assert partial_stop_len("a\n\n", ["\n\nUser:", "\n"]) == 2

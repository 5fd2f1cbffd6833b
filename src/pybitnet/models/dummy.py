"""Dummy models: random-ternary checkpoints in the exact hub layouts, with a real byte-level BPE tokenizer.

No model hub is reachable from our machines, so tests and benchmarks run on these. A dummy of a preset has the
preset's real shapes, the HF packed format (or the legacy 1bitLLM latent format) and a tokenizer whose special
tokens sit at the ids the config names, so pybitnet and transformers both load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..errors import ConfigError
from .config import ModelConfig
from .presets import preset

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

# The Llama 3 pre-tokenizer split: contractions, letter runs, 1-3 digit groups, punctuation, whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# microsoft/bitnet-b1.58-2B-4T's chat template, as its tokenizer_config.json holds it.
CHAT_TEMPLATE_2B4T = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# Training text for the BPE merges: plain English on varied topics, so common words become single tokens.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small language model learns to predict the next word in a
sentence, one token at a time. It reads a prompt, builds a cache of keys and values, and then writes an
answer.
Weights that take only three values, minus one, zero and plus one, need less than two bits each. The model
multiplies small integers and adds them up, which is cheap on an ordinary processor.

Once upon a time there was a little village at the edge of a forest. Every morning the baker opened his shop
and the children ran to school. In the evening the people sat together, talked about the weather and told old
stories about the river, the mountains and the sea. Nobody knew where the river began, but everyone agreed
that the water was cold and clear.

Hello! How are you today? I am fine, thank you. What would you like to do this afternoon? We could go for a
walk in the park, read a book, or cook dinner for our friends. Please tell me what you think, and I will
help you plan the day. The weather is nice, so let us go outside while the sun is shining.

Computers store numbers as bits. Eight bits make a byte, and a byte can hold two hundred and fifty six
different values. Programs read data from memory, compute a result and write it back. Good software is
tested: every function has a test that checks its answer against a known value, and the tests run on every
change.

The history of science is a history of questions. Why does the apple fall? Why is the sky blue? How far away
are the stars? People measured, wrote down what they saw and shared their results with each other. Over many
years they found simple rules that explain a great number of things, from the motion of the planets to the
behaviour of light and heat.

User: Can you explain what a neural network is?
Assistant: A neural network is a function with many parameters. It is trained on examples: for each input
it makes a guess, the guess is compared with the right answer, and the parameters are changed a little so that
the next guess is better. After many steps the network gives good answers on inputs it has never seen.

In 2024 and 2025, models with 1, 2, 3, 7, 8 and 70 billion parameters were trained on trillions of tokens.
Numbers such as 3.14, 42, 100 and 2560 appear in code and in tables: x = 1; y = x + 2; print(y).
"""


def special_token_ids(
    vocab_size: int, bos_id: int, eos_id: int, eot_id: int | None = None, pad_id: int | None = None
) -> dict[int, str]:
    """Id -> special token: the named ones where the config puts them, reserved fillers around them.

    Specials near the top of the vocabulary get a Llama 3 block (the last 256 ids: <|begin_of_text|> first,
    <|start_header_id|>/<|end_header_id|> at +6/+7, <|eot_id|> at +9); specials at low ids get a block from 0.
    """
    high = bos_id >= vocab_size - 256 and vocab_size > 512
    if eot_id is None:
        eot_id = bos_id + 9 if high else max(bos_id, eos_id) + 1
    ids = [bos_id, eos_id, eot_id] + ([] if pad_id is None else [pad_id])
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"special token ids collide: bos {bos_id}, eos {eos_id}, eot {eot_id}, pad {pad_id}"
        )
    if any(i < 0 or i >= vocab_size for i in ids):
        raise ConfigError(f"special token ids {ids} must lie inside the vocabulary (size {vocab_size})")
    named = dict(zip(ids, (BOS, EOS, EOT, "<|pad|>")[: len(ids)], strict=True))
    if high:
        named.setdefault(bos_id + 6, "<|start_header_id|>")
        named.setdefault(bos_id + 7, "<|end_header_id|>")
    block = sorted(set(range(bos_id, vocab_size) if high else range(max(named) + 1)) | set(named))
    specials, reserved = {}, 0
    for i in block:
        if i in named:
            specials[i] = named[i]
        else:
            specials[i] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return specials


def _filler_tokens(n: int, taken: set[str]) -> list[str]:
    """`n` distinct byte-level tokens spelling made-up lowercase words ("Ġqx" decodes to " qx"). No merge
    builds them, so encoding yields one only for a whole word spelled so; every one decodes, so random
    generations read as word salad."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    out: list[str] = []
    i = 0
    while len(out) < n:
        word, k = "", i
        while True:
            word = letters[k % 26] + word
            k = k // 26 - 1
            if k < 0:
                break
        token = ("Ġ" if i % 3 else "") + word
        if token not in taken:
            out.append(token)
        i += 1
    return out


def _train_bpe(text: str, vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(tokens in training order, merges) of a byte-level BPE trained on `text`: at most `vocab_size`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    vocab = tok.get_vocab()
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return sorted(vocab, key=vocab.__getitem__), merges


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tokenizer(
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    eot_id: int | None = None,
    pad_id: int | None = None,
    text: str = TRAINING_TEXT,
) -> Tokenizer:
    """A Llama-3-style byte-level BPE tokenizer of exactly `vocab_size` ids, trained on `text`.

    Special tokens sit at the given ids (see `special_token_ids`); the remaining ids hold the 256 byte tokens,
    the learned merges and, when the text yields fewer merges than there are ids, decodable filler words.
    Encoding prepends <|begin_of_text|> (as Llama 3 does with add_special_tokens).
    """
    specials = special_token_ids(vocab_size, bos_id, eos_id, eot_id, pad_id)
    free_ids = [i for i in range(vocab_size) if i not in specials]
    if len(free_ids) < 256:
        raise ConfigError(f"vocab_size {vocab_size} leaves fewer than 256 ids for the byte tokens")
    tokens, merges = _train_bpe(text, len(free_ids))
    tokens += _filler_tokens(len(free_ids) - len(tokens), set(tokens))
    vocab = dict(zip(tokens, free_ids, strict=True))
    vocab.update({name: i for i, name in specials.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([specials[i] for i in sorted(specials)])
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return tok


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tokenizer_files(tok: Tokenizer, config: ModelConfig, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the 2B-4T chat template), special_tokens_map.json and
    generation_config.json (which stops on both <|end_of_text|> and <|eot_id|>)."""
    tok.save(str(out_dir / "tokenizer.json"))
    eot_id = tok.token_to_id(EOT)
    added = {
        str(i): {**_token_entry(t.content), "special": True}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    tokenizer_config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE_2B4T,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": config.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {"bos_token": _token_entry(BOS), "eos_token": _token_entry(EOS)}
    if config.pad_token_id is not None:
        pad = tok.id_to_token(config.pad_token_id)
        tokenizer_config["pad_token"] = pad
        special_map["pad_token"] = _token_entry(pad)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    generation_config = {
        "_from_model_config": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": [*eos, eot_id] if eot_id not in eos else eos,
    }
    if config.pad_token_id is not None:
        generation_config["pad_token_id"] = config.pad_token_id
    for name, data in (
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_map),
        ("generation_config.json", generation_config),
    ):
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_for(config: ModelConfig) -> Tokenizer:
    """The dummy tokenizer matching a config's vocabulary and special ids."""
    if config.bos_token_id is None or config.eos_token_id is None:
        raise ConfigError("a dummy tokenizer needs bos_token_id and eos_token_id in the config")
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return build_tokenizer(config.vocab_size, config.bos_token_id, eos, pad_id=config.pad_token_id)


def create_dummy(
    preset_or_config: str | ModelConfig,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a random-ternary checkpoint of a preset (or config) to `out_dir` and return the directory.

    Ternary families get the HF packed format; the legacy family gets 1bitLLM's latent float weights. Either
    way the directory also holds the tokenizer files, so `pybitnet.load_model` and transformers' Auto classes
    load it.
    """
    from ..formats.hf import save_hf_model
    from .random_init import random_latent_model, random_model

    config = preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.family == "legacy":
        model = random_latent_model(config, seed=seed, dtype=dtype)
    else:
        model = random_model(config, seed=seed, dtype=dtype, kernel="reference")
    save_hf_model(model, out)
    del model
    write_tokenizer_files(tokenizer_for(config), config, out)
    return out

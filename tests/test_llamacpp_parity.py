"""llama.cpp parity: a llama-style ternary model exported to GGUF TQ2_0 generates the same 16 greedy tokens
in llama.cpp (llama-cpp-python) as in pybitnet, with logits that agree to float rounding.

Why the setup makes this a sharp test rather than a lucky one:
- llama.cpp quantizes activations to int8 per 256-value block (Q8_K: absmax / 127, round to nearest even)
  where pybitnet quantizes per token. With every in_features exactly 256 (hidden, intermediate and
  heads * head_dim) the two are the same quantization, so both compute the same W1.58A8 function.
- llama.cpp's default F16 KV cache rounds V to fp16 before o_proj; that nudges values across int8 rounding
  boundaries and moves logits by about 1%, as much as activation quantization itself. An F32 cache removes
  it. What remains is llama.cpp's fp16 rounding of the final hidden state for the F16 output head (~1e-4).
- Random models have near-ties in their logits, so the seed is chosen (by pybitnet alone, before llama.cpp
  runs) so that every greedy step wins by a margin far above that rounding; the logits are checked as well.
A run with llama.cpp's default F16 KV cache is checked loosely: the exported file works as users run it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pybitnet.formats.gguf_export import save_gguf
from pybitnet.formats.gguf_import import load_gguf_model
from pybitnet.kernels import get_kernel
from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset
from pybitnet.models.random_init import random_model

llama_cpp = pytest.importorskip("llama_cpp")

CONFIG = preset(
    "tiny-llama", hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
)
PROMPT = [1, 40, 50, 60, 70]  # <|begin_of_text|> and four ordinary tokens
N_NEW = 16
MIN_MARGIN = 0.01  # top-1 minus top-2 logit at every greedy step: ~50x the fp16 head rounding
GGML_TYPE_F32 = 0


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """pybitnet's greedy tokens and the logits at every position of prompt + tokens (full forward a step)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt) :], model(torch.tensor([ids]))[0].numpy()


def llama_cpp_greedy(path, prompt: list[int], n: int, **kwargs) -> tuple[list[int], np.ndarray]:
    llm = llama_cpp.Llama(
        str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False, **kwargs
    )
    llm.eval(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, np.array(llm.scores[: llm.n_tokens])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """GGUF files (TQ2_0 and TQ1_0) of the first seed whose greedy run has a clear winner at every step, and
    its tokens and logits in pybitnet (reference kernel, weights read back from the TQ2_0 file)."""
    tmp = tmp_path_factory.mktemp("parity")
    tokenizer_dir = create_dummy(CONFIG, tmp / "tokenizer")
    kernel = get_kernel("reference")
    for seed in range(40):
        model = random_model(CONFIG, seed=seed, kernel=kernel)
        path = save_gguf(model, tmp / f"m{seed}.gguf", tokenizer_dir)
        tokens, logits = greedy(load_gguf_model(path, kernel), PROMPT, N_NEW)
        top2 = np.sort(logits[len(PROMPT) - 1 : -1], axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > MIN_MARGIN:
            tq1 = save_gguf(model, tmp / f"m{seed}-tq1.gguf", tokenizer_dir, weight_type="tq1_0")
            return {"tq2_0": path, "tq1_0": tq1}, tokens, logits
    pytest.fail(f"no seed below 40 gives greedy margins above {MIN_MARGIN}; the random model init changed?")


@pytest.mark.parametrize("weight_type", ["tq2_0", "tq1_0"])
def test_llama_cpp_generates_the_same_16_greedy_tokens(exported, weight_type):
    paths, tokens, logits = exported
    theirs, their_logits = llama_cpp_greedy(
        paths[weight_type], PROMPT, N_NEW, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32
    )
    assert theirs == tokens
    scale = np.abs(logits).max()
    assert np.abs(their_logits - logits).max() / scale < 1e-3  # measured: 2e-4


def test_llama_cpp_default_f16_cache_stays_close(exported):
    paths, tokens, logits = exported
    llm = llama_cpp.Llama(str(paths["tq2_0"]), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT + tokens)  # teacher-forced on pybitnet's tokens
    theirs = np.array(llm.scores[: llm.n_tokens])
    assert np.abs(theirs - logits).max() / np.abs(logits).max() < 0.05  # measured: 0.9%

"""Greedy generation equals transformers' generate (64 new tokens, fp32, reference kernel) on random
checkpoints of each ternary family.

Random models can have near-tied logits, where float rounding differences may flip an argmax. The checkpoints
and prompts here were chosen so that every step's top-two log-probability gap is well above float noise; the
test asserts that gap too, so a tie introduced later fails loudly instead of as a puzzling token mismatch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pybitnet import SamplingParams
from test_engine_helpers import model_dir, tiny_llm
from transformers_helpers import legacy_as_transformers

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 64
PROMPT = [1, 43, 416, 82, 269, 279, 297]
MIN_GAP = 1e-4  # top-1 minus top-2 log-probability; float32 noise here is ~1e-6


def _reference_dir(name: str, tmp_path: Path) -> Path:
    """The checkpoint transformers loads for model_dir(name): it has no class for 1bitLLM's legacy layout, so
    that one is rewritten for BitNetForCausalLM with online AutoBitLinear quantization."""
    if name == "tiny-legacy":
        return legacy_as_transformers(model_dir(name), tmp_path / "hf")
    return model_dir(name)


def _transformers_greedy(path: Path, prompt: list[int], **kwargs) -> list[int]:
    """transformers' greedy continuation; min_new_tokens keeps it from stopping (it masks the EOS ids of
    generation_config.json, as pybitnet's min_tokens masks the tokenizer's stop ids)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(autouse=True)
def _no_torch_compile():
    # transformers' BitLinear compiles its activation quantizer; eager is the same math and much faster here
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.mark.parametrize(
    ("name", "penalty"),
    [
        ("tiny-llama", 1.0),
        ("tiny-bitnet-untied", 1.0),
        ("tiny-legacy", 1.0),
        (
            "tiny-bitnet",
            5.0,
        ),  # tied: plain greedy repeats one token, so compare with a repetition penalty too
    ],
)
def test_greedy_equals_transformers_generate(name, penalty, tmp_path):
    llm = tiny_llm(name)
    params = SamplingParams(
        max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0, logprobs=2, repetition_penalty=penalty
    )
    out = llm.generate([PROMPT], params)[0]
    ref = _transformers_greedy(_reference_dir(name, tmp_path), PROMPT, repetition_penalty=penalty)
    assert out.token_ids == ref
    assert len(set(out.token_ids)) > 16  # a varied trajectory, not one repeated token
    if penalty == 1.0:
        gaps = [sorted((e.logprob for e in entry.values()), reverse=True) for entry in out.logprobs]
        assert min(g[0] - g[1] for g in gaps) > MIN_GAP

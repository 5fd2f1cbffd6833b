"""Generation: tokenizer, chat templates, sampler, KV-cache model runner, continuous-batching engine, LLM."""

from .engine import Engine
from .llm import LLM, TextStream
from .outputs import Logprob, RequestOutput, StepOutput, Timings
from .params import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "LLM",
    "Engine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StepOutput",
    "TextStream",
    "Timings",
    "Tokenizer",
]

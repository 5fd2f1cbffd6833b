"""Generate with the Python API: a batch of completions, then a stream of text deltas.

    python examples/generate.py [MODEL]

Without MODEL it runs the small model that ships inside the package, offline; MODEL may be a hub id, a local
Hugging Face directory or a .gguf file.
"""

import sys

import pybitnet

llm = pybitnet.LLM(sys.argv[1] if len(sys.argv) > 1 else None)
params = pybitnet.SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=0)
for out in llm.generate(["def fibonacci(n):", "class Stack:"], params):
    print(f"--- {out.finish_reason}, {len(out.token_ids)} tokens\n{out.prompt}{out.text}")

print("--- streamed, greedy")
for delta in llm.stream("import os\n", pybitnet.SamplingParams(max_tokens=24, temperature=0.0)):
    print(delta, end="", flush=True)
print()

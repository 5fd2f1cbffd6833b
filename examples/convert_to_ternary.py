"""Turn a full-precision transformers causal LM into a ternary BitNet and fine-tune it, with the λ warm-up
that moves its weights and activations from full precision to ternary / int8 gradually.

    python examples/convert_to_ternary.py [--steps 60]

A tiny Llama with random weights stands in for a real checkpoint (no download): it first learns a short text
in full precision, then `to_bitnet` swaps its linears for BitLinear (same weights as latent weights, 2B-4T
sub-norms added) and training goes on while λ rises from 0 to 1. The losses printed along the way show the
model keeping what it learned instead of restarting from the loss of a random model (~5.5).
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pybitnet.convert import set_quant_strength, to_bitnet

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60, help="steps in full precision, and again while converting")
args = ap.parse_args()

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
model = LlamaForCausalLM(config)
text = b"BitNet b1.58: every weight is -1, 0 or +1, every activation an int8. " * 4
ids = torch.tensor([list(text)])
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)


def train_step() -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


for _ in range(args.steps):
    fp_loss = train_step()
print(f"full precision: loss {fp_loss:.3f}")

to_bitnet(model, sub_norms=True, quant_strength=0.0)  # λ = 0: the same outputs as before
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(1, args.steps + 1):
    lam = min(1.0, step / (args.steps // 2))  # λ from 0 to 1 over the first half, then fully ternary
    set_quant_strength(model, lam)
    loss = train_step()
    if step % (args.steps // 6) == 0:
        print(f"step {step:3d}  λ {lam:.2f}  loss {loss:.3f}")
print(f"ternary: loss {loss:.3f} (full precision before the switch: {fp_loss:.3f})")

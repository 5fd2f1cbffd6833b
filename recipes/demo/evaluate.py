"""Held-out perplexity of the exported default model through the inference path (packed ternary weights,
int8 activations, a CPU kernel) and of its full-precision twin's master weights, on the same validation
windows the trainer evaluates.

    python recipes/demo/evaluate.py [--recipe recipes/demo.yaml] [--model out/demo/final/hf]
        [--twin out/demo-fp/final/master]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pybitnet import load_model
from pybitnet.models import ModelConfig
from pybitnet.train import TextTokenizer, TokenDataset, config_from_dict, read_recipe
from pybitnet.train.distributed import DistInfo
from pybitnet.train.model import init_model
from pybitnet.train.trainer import evaluate


def twin_model(master: Path) -> torch.nn.Module:
    """The full-precision twin (nn.Linear) from the master weights its run exported."""
    config = ModelConfig(**json.loads((master / "config.json").read_text())["model_config"])
    model = init_model(config, quantize=False, seed=0)
    state = {k: v.float() for k, v in load_file(str(master / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/demo.yaml")
    ap.add_argument("--model", default="out/demo/final/hf")
    ap.add_argument("--twin", default="out/demo-fp/final/master")
    ap.add_argument("--kernel", default=None, help="force a kernel, e.g. reference")
    args = ap.parse_args()
    # fp32 as `pybitnet run` computes on a CPU, whatever precision the recipe trained in
    cfg = config_from_dict({**read_recipe(args.recipe), "precision": "fp32"})
    tok = TextTokenizer.from_dir(cfg.tokenizer)
    val = TokenDataset(cfg.val_data, tok, cfg.seq_len, shuffle=False)
    cpu, info = torch.device("cpu"), DistInfo()
    results = {"val_windows": len(val), "val_tokens": len(val) * cfg.seq_len}
    ternary = load_model(args.model, kernel=args.kernel)
    loss, ppl = evaluate(ternary, val, cfg, info, cpu)
    results["ternary_packed"] = {"val_loss": round(loss, 4), "val_ppl": round(ppl, 3)}
    if Path(args.twin).is_dir():
        loss, ppl = evaluate(twin_model(Path(args.twin)), val, cfg, info, cpu)
        results["fp_twin"] = {"val_loss": round(loss, 4), "val_ppl": round(ppl, 3)}
        results["ppl_ratio"] = round(results["ternary_packed"]["val_ppl"] / ppl, 4)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

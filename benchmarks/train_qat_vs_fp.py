"""QAT (ternary BitLinear) against its full-precision twin (nn.Linear): same corpus, tokens, model shape and
recipe; validation perplexity of both, through the trainer (`pybitnet.train.train`).

    python benchmarks/train_qat_vs_fp.py [--corpus-glob '/usr/share/vim/vim90/doc/usr_*.txt'] [--steps 600]

The corpus is any set of plain-text files (default: the Vim user manual that Debian's vim-runtime installs);
the last `--val-files` files are held out for validation. A byte-level BPE tokenizer is trained on the
training files. The run also converts the trained fp twin to ternary with and without the λ warm-up and
reports the validation loss right after the switch.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import time
from pathlib import Path

import torch

from pybitnet.convert import set_quant_strength, to_bitnet
from pybitnet.models.dummy import build_tokenizer, write_tokenizer_files
from pybitnet.models.presets import preset
from pybitnet.train import TextTokenizer, TokenDataset, TrainConfig, train
from pybitnet.train.distributed import DistInfo
from pybitnet.train.model import init_model, model_config
from pybitnet.train.trainer import evaluate, summed_loss

SHAPE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 2048}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-glob", default="/usr/share/vim/vim90/doc/usr_*.txt")
    ap.add_argument("--val-files", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="/tmp/pybitnet-qat-vs-fp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", help="fp32, or bf16 (autocast; use it on GPUs)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(SHAPE, hidden_size=args.width, intermediate_size=args.width * 11 // 4)
    shape.update(num_hidden_layers=args.layers, num_attention_heads=max(args.width // 64, 1))
    shape.update(num_key_value_heads=max(args.width // 128, 1))
    files = sorted(glob.glob(args.corpus_glob))
    if len(files) <= args.val_files:
        raise SystemExit(f"need more than {args.val_files} files matching {args.corpus_glob}")
    train_files, val_files = files[: -args.val_files], files[-args.val_files :]
    out = Path(args.out)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(Path(f).read_text(errors="replace") for f in train_files)
    config = preset("tiny-bitnet", **shape)
    write_tokenizer_files(build_tokenizer(config.vocab_size, 1, 2, text=text), config, tok_dir)

    base = dict(
        preset="tiny-bitnet", model_overrides=shape, tokenizer=str(tok_dir), train_data=train_files,
        val_data=val_files, seq_len=args.seq_len, micro_batch_size=args.batch, max_steps=args.steps,
        min_lr=2e-4, warmup_steps=args.steps // 20, schedule="cosine", weight_decay=0.1,
        precision=args.precision, loggers=["jsonl"], log_interval=50, export=False, resume=False, seed=0,
        device=args.device,
    )  # fmt: skip
    results = {}
    for name, quantize, lr in (("qat_ternary", True, 3e-3), ("fp_twin", False, 2e-3)):
        t0 = time.perf_counter()
        r = train(TrainConfig(**base, quantize=quantize, lr=lr, out_dir=str(out / name)))
        seconds = round(time.perf_counter() - t0)
        results[name] = {"val_loss": round(r.val_loss, 4), "val_ppl": round(r.val_ppl, 2), "lr": lr,
                         "train_loss_last": round(r.losses[args.steps], 4), "seconds": seconds}  # fmt: skip
        print(json.dumps({name: results[name]}), flush=True)

    # fp -> ternary switch on the trained twin: all at once, and with a λ warm-up of 50 steps
    from safetensors.torch import load_file

    tok = TextTokenizer.from_dir(tok_dir)
    val = TokenDataset(val_files, tok, args.seq_len, shuffle=False)
    train_ds = TokenDataset(train_files, tok, args.seq_len, seed=1)
    cfg = TrainConfig(**base, lr=2e-3, quantize=False, out_dir=str(out / "fp_twin"))
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
    if args.device != "auto":
        device = torch.device(args.device)
    fp = init_model(model_config("tiny-bitnet", shape), False, 0)
    ckpt = sorted((out / "fp_twin" / "checkpoints").iterdir())[-1]
    fp.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    fp.to(device)
    fp.to(device)
    info, cpu = DistInfo(), device
    fp_loss = evaluate(fp, val, cfg, info, cpu)[0]
    hard = to_bitnet(copy.deepcopy(fp))
    hard_loss = evaluate(hard, val, cfg, info, cpu)[0]
    soft = to_bitnet(copy.deepcopy(fp), quant_strength=0.0)
    opt = torch.optim.AdamW(soft.parameters(), lr=5e-4, weight_decay=0.0)
    worst = 0.0
    for step in range(50):
        set_quant_strength(soft, (step + 1) / 50)
        ids, labels = (t.to(device) for t in train_ds.next_batch(args.batch))
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            loss = summed_loss(soft, ids, labels) / (labels[:, 1:] != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 9:
            worst = max(worst, evaluate(soft, val, cfg, info, cpu)[0])
    final = evaluate(soft, val, cfg, info, cpu)[0]
    results["switch"] = {"fp_val_loss": round(fp_loss, 4), "hard_switch_val_loss": round(hard_loss, 4)}
    results["switch"].update(warmup50_worst_val_loss=round(worst, 4), warmup50_final_val_loss=round(final, 4))
    meta = {"corpus": args.corpus_glob, "train_files": len(train_files), "val_files": len(val_files),
            "train_samples": len(train_ds), "val_samples": len(val), "torch": torch.__version__}  # fmt: skip
    meta.update(vars(args))
    print(json.dumps(meta))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

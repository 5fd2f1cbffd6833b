"""pybitnet's C kernels against llama.cpp (llama-cpp-python) on the same weights, same machine, same run.

Makes a random ternary model of the bitnet-2b-4t shape (llama-style, so mainline llama.cpp runs it: SiLU, no
sub-norms; the matrices, and so the work per token, are those of 2B-4T), exports those weights to GGUF TQ2_0
with F16 and with Q8_0 embeddings, and times prompt processing and generation in both at one thread count.

    python benchmarks/cpu_vs_llamacpp.py [--threads 2] [--prompt 128] [--gen 64] [--reps 3]

Also prints the machine's read bandwidth and pybitnet's decode bandwidth efficiency
(tok/s x bytes read per token / bandwidth). Without llama-cpp-python it measures pybitnet alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pybitnet
from pybitnet.bench import bench, read_bandwidth, weight_bytes_and_params
from pybitnet.formats.gguf_export import save_gguf
from pybitnet.kernels import cpu
from pybitnet.models.dummy import create_dummy
from pybitnet.models.presets import preset

CONFIG = preset("bitnet-2b-4t", family="llama", hidden_act="silu", max_position_embeddings=2048)


def time_llama_cpp(path: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_threads=threads, verbose=False
    )
    prompt = torch.randint(10, 1000, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def pp() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        return n_prompt / (time.perf_counter() - t)

    def tg() -> float:
        llm.reset()
        token = prompt[0]
        t = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return n_gen / (time.perf_counter() - t)

    out = {}
    for name, fn in ((f"pp{n_prompt}", pp), (f"tg{n_gen}", tg)):
        fn()
        out[name] = statistics.fmean(fn() for _ in range(reps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tests = [("pp", args.prompt), ("tg", args.gen)]

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = create_dummy(CONFIG, Path(tmp) / "hf", seed=0, dtype=torch.bfloat16)
        model = pybitnet.load_model(hf_dir)  # the default CPU kernel and int8 head
        rows = {
            r.test: r
            for r in bench(model, "bitnet-2b-4t (llama-style)", "pybitnet", args.threads, tests, args.reps)
        }
        size, _ = weight_bytes_and_params(model)
        print(f"pybitnet ({cpu.best_isa()}, int8 head), {args.threads} threads, weights {size / 1e9:.3f} GB")
        for name, r in rows.items():
            print(f"  {name}: {r.ts_mean:.2f} ± {r.ts_sd:.2f} t/s   peak RSS {r.peak_rss_bytes / 1e9:.2f} GB")

        bw = read_bandwidth(args.threads)
        # decode reads every ternary weight and the head once per token; embeddings: one row
        decode_bytes = size - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
        tg = rows[f"tg{args.gen}"].ts_mean
        print(
            f"read bandwidth {bw:.1f} GB/s; decode reads {decode_bytes / 1e9:.3f} GB/token; "
            f"efficiency {tg * decode_bytes / 1e9 / bw:.0%}"
        )

        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp not measured")
            return
        del model
        for embed in ("f16", "q8_0"):
            path = Path(tmp) / f"m-{embed}.gguf"
            save_gguf(pybitnet.load_model(hf_dir, kernel="reference"), path, hf_dir, "tq2_0", embed)
            theirs = time_llama_cpp(path, args.threads, args.prompt, args.gen, args.reps)
            for name, value in theirs.items():
                ours = rows[name].ts_mean
                print(
                    f"llama.cpp TQ2_0 + {embed} head {name}: {value:.2f} t/s; "
                    f"pybitnet / llama.cpp = {ours / value:.2f}x"
                )


if __name__ == "__main__":
    main()

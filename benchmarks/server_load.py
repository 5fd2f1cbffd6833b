"""Load on `pybitnet serve`: aggregate tokens/s and request latency (p50, p99) at several numbers of
concurrent streaming clients, against the same engine driven in-process (the ratio is the server's overhead).

Starts `pybitnet serve` in a child process over a model (by default a dummy of --preset written to a temporary
directory), then for each concurrency C runs C clients in a closed loop: each sends --requests-per-client
streamed chat completions one after another (greedy, --max-tokens new tokens each, end-of-sequence ignored so
every request makes exactly that many). Aggregate tok/s = generated tokens / wall time of the level; latency
= a request's time from sending it to the end of its stream; TTFT = to its first token.

The in-process peer runs the same requests (same prompt, same parameters, C at a time) through
`LLM.generate` on an engine with C slots in this process, while the server idles. Server and peer runs
alternate --repeats times per level and each reports its best run (the machine may be shared); the latency
figures are those of the server's best run.

    python benchmarks/server_load.py [--concurrency 1,8,32] [--max-tokens 64] [--requests-per-client 3]
        [--repeats 3] [--preset tiny-bitnet | --model DIR] [--kernel NAME] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

MESSAGES = [{"role": "user", "content": "Tell me a story about the river and the mountains."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def _one_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed chat completion."""
    body = {
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return latency, first if first is not None else latency, tokens


async def _level(url: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop() -> list[tuple[float, float, int]]:
            return [await _one_request(client, url, max_tokens) for _ in range(per_client)]

        start = time.perf_counter()
        per_loop = await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    results = [r for loop in per_loop for r in loop]
    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    if tokens != len(results) * max_tokens:
        raise RuntimeError(f"expected {len(results) * max_tokens} tokens, got {tokens}")
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p99_s": _percentile(latencies, 0.99),
        "ttft_p50_s": _percentile(ttfts, 0.5),
        "ttft_p99_s": _percentile(ttfts, 0.99),
    }


def _serve(model: str, port: int, parallel: int, kernel: str | None, threads: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-c",
        "from pybitnet.cli.app import main; main()",
        "serve",
        model,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--parallel",
        str(parallel),
        "--max-queue",
        str(parallel),
        "--log-level",
        "warning",
    ]
    if kernel:
        command += ["--kernel", kernel]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not become ready in 300 s")
        time.sleep(0.2)


def _engine_peer(model: str, concurrency: int, kernel: str | None, threads: int):
    """An LLM in this process with `concurrency` slots and the server's kernel and threads, warmed up."""
    from pybitnet import LLM, SamplingParams

    llm = LLM(model, device="cpu", kernel=kernel, threads=threads or None, max_num_seqs=concurrency)
    llm.generate([llm.chat_prompt(MESSAGES)], SamplingParams(max_tokens=2, temperature=0))
    return llm


def _engine_level(llm, concurrency: int, per_client: int, max_tokens: int) -> dict:
    """The server's requests through LLM.generate in this process, `concurrency` at a time."""
    from pybitnet import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompt = llm.chat_prompt(MESSAGES)
    start = time.perf_counter()
    tokens = 0
    for _ in range(per_client):
        tokens += sum(len(o.token_ids) for o in llm.generate([prompt] * concurrency, params))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall}


def _table(served: list[dict], peers: list[dict]) -> str:
    columns = ["clients", "requests", "tok/s", "latency p50", "latency p99", "TTFT p50", "TTFT p99"]
    columns += ["engine tok/s", "ratio"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for i, r in enumerate(served):
        peer = peers[i]["tok_per_s"] if peers else None
        cells = [
            str(r["concurrency"]),
            str(r["requests"]),
            f"{r['tok_per_s']:.1f}",
            f"{r['latency_p50_s']:.3f} s",
            f"{r['latency_p99_s']:.3f} s",
            f"{r['ttft_p50_s'] * 1000:.0f} ms",
            f"{r['ttft_p99_s'] * 1000:.0f} ms",
            f"{peer:.1f}" if peer else "-",
            f"{r['tok_per_s'] / peer:.2f}" if peer else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory or hub id (default: a dummy of --preset)")
    parser.add_argument("--preset", default="tiny-bitnet")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kernel", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per level; the best is reported")
    parser.add_argument("--no-engine-peer", action="store_true", help="skip the in-process engine runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import torch

            from pybitnet.models.dummy import create_dummy
            from pybitnet.models.presets import preset

            # untied: a tied random model mostly repeats its input token; the shapes are the preset's
            config = preset(args.preset, tie_word_embeddings=False)
            model = str(create_dummy(config, Path(tmp) / args.preset, seed=0, dtype=torch.float32))
        port = _free_port()
        server = _serve(model, port, max(levels), args.kernel, args.threads)
        url = f"http://127.0.0.1:{port}"
        served, peers = [], []
        try:
            asyncio.run(_level(url, 1, 1, 4))  # warm-up
            for c in levels:
                # server and in-process runs alternate, and each keeps its best: the machine is shared
                llm = None if args.no_engine_peer else _engine_peer(model, c, args.kernel, args.threads)
                best_served: dict | None = None
                best_peer: dict | None = None
                for _ in range(args.repeats):
                    run = asyncio.run(_level(url, c, args.requests_per_client, args.max_tokens))
                    print(json.dumps(run), flush=True)
                    if best_served is None or run["tok_per_s"] > best_served["tok_per_s"]:
                        best_served = run
                    if llm is not None:
                        peer = _engine_level(llm, c, args.requests_per_client, args.max_tokens)
                        print(json.dumps({"engine": peer}), flush=True)
                        if best_peer is None or peer["tok_per_s"] > best_peer["tok_per_s"]:
                            best_peer = peer
                served.append(best_served)
                if best_peer is not None:
                    peers.append(best_peer)
                del llm
        finally:
            server.terminate()
            server.wait(60)

    print(f"\n{date.today()}, {platform.machine()}, Python {platform.python_version()}")
    per_client = f"{args.requests_per_client} requests per client, best of {args.repeats} runs"
    print(f"model {args.model or args.preset}, max_tokens {args.max_tokens}, {per_client}")
    print(_table(served, peers))
    if args.json:
        args.json.write_text(json.dumps({"server": served, "engine": peers}, indent=2))


if __name__ == "__main__":
    main()

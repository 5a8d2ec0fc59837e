"""Requests/s and tokens/s of `quantkit serve` for 1, 4 and 8 concurrent streaming clients, with --max-batch 1
(one request at a time) and --max-batch 8 (batched decode) side by side, in one run; --scenario stall: how long a
long prompt stalls running streams, prefilled whole vs in chunks; --scenario prefix: time to first token of a
repeated long prefix with and without the prefix cache.

The real server (FastAPI on uvicorn, one generation worker) runs in a background thread on a free local port with a
small random Mistral (or --model FOLDER); each level sends the same --requests greedy streaming chat requests, split
over that many client threads, through the official `openai` client. Figures: requests/s and generated tokens/s over
the level's wall time, the median time to the first token (the queue's wait as clients are added), and the mean
number of rows per decode step the batched server ran.
Stall: --streams streaming chats run (sampled: greedy, a random model can loop on tokens that print nothing, which
would read as a gap), then a --long-prompt-token prompt arrives; the figure is the longest gap between two text
chunks of a running stream from its arrival to its first token, with --prefill-chunk 0 (the prompt
prefilled whole, as before) and 512 (chunks between decode steps), on a smaller model (--stall-layers,
--stall-dim) so the two 50,000-token prefills take minutes, not hours, on a CPU.
Prefix: a --prefix-tokens prompt, then the same prefix with another ending, with and without the prefix cache.
Run: python benchmarks/bench_serve.py [--layers 8 --dim 512 --requests 16 --max-tokens 32 --threads 1]
     python benchmarks/bench_serve.py --scenario stall [--long-prompt 50000 --streams 4]
     python benchmarks/bench_serve.py --scenario prefix [--prefix-tokens 4000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

LEVELS = (1, 4, 8)
BATCHES = (1, 8)


def build_folder(folder: Path, args: argparse.Namespace) -> None:
    """A random Mistral (GQA, SwiGLU) in the HF layout, with mistral-common's v3 tokenizer file beside it."""
    import mistral_common
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=32768, hidden_size=args.dim, intermediate_size=args.dim * 3,
                        num_hidden_layers=args.layers, num_attention_heads=args.dim // 64,
                        num_key_value_heads=max(1, args.dim // 256), head_dim=64, rope_theta=1e6,
                        sliding_window=None, tie_word_embeddings=False)  # fmt: skip
    MistralForCausalLM(cfg).eval().save_pretrained(folder)
    tokenizer = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    shutil.copy(tokenizer, folder / "tokenizer.model.v3")


def run_level(url: str, clients: int, requests: int, max_tokens: int, name: str) -> dict:
    """Send `requests` streaming chats over `clients` threads; figures over the wall time of the whole level."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", timeout=600, max_retries=0)
    tokens, first, errors = [], [], []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"Request {i}: tell me about the number {i}."}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        t_first = None
        for chunk in stream:
            if t_first is None and chunk.choices and chunk.choices[0].delta.content:
                t_first = time.perf_counter() - t0
            if chunk.usage is not None:
                with lock:
                    tokens.append(chunk.usage.completion_tokens)
                    first.append(t_first if t_first is not None else time.perf_counter() - t0)

    def worker(k: int) -> None:
        try:
            for i in range(k, requests, clients):
                one(i)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if errors or len(tokens) != requests:
        raise SystemExit(f"{clients} clients: {len(tokens)}/{requests} answers, errors: {errors[:3]}")
    return {"clients": clients, "requests_per_s": requests / wall, "tokens_per_s": sum(tokens) / wall,
            "ttft_median_s": statistics.median(first), "wall_s": wall, "tokens": sum(tokens)}  # fmt: skip


def direct_tokens_per_s(model, tokenizer, requests: int, max_tokens: int) -> float:
    """The same greedy chats through generate() directly: what the server's overhead is measured against."""
    from quantkit.model.generate import generate

    tokens, t0 = 0, time.perf_counter()
    for i in range(requests):
        messages = [{"role": "user", "content": f"Request {i}: tell me about the number {i}."}]
        ids = tokenizer.encode_chat(messages).input_ids
        tokens += len(generate(model, ids, max_new_tokens=max_tokens, stop_ids=[tokenizer.eos_id]).output_ids)
    return tokens / (time.perf_counter() - t0)


def served(model, tokenizer, context: int, **engine_kw):
    """(engine, the serve_in_thread context) for model with Engine options engine_kw."""
    from quantkit.serve.app import create_app
    from quantkit.serve.engine import Engine
    from quantkit.serve.server import serve_in_thread

    engine = Engine(model, tokenizer, **engine_kw)
    return engine, serve_in_thread(create_app(engine, "bench", context))


def stall(url: str, streams: int, long_ids: list[int]) -> dict:
    """Start `streams` endless streaming chats, then send long_ids as one completion; the longest gap between two
    tokens of a running stream while the long prompt waits for its first token, and that wait."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", timeout=1200, max_retries=0)
    stamps: list[list[float]] = [[] for _ in range(streams)]
    started, stop = threading.Barrier(streams + 1), threading.Event()

    def run(i: int) -> None:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": f"Stream {i}: count to a million."}],
            max_tokens=100000, temperature=1.0, seed=i, stream=True)  # fmt: skip
        for n, _ in enumerate(stream):
            stamps[i].append(time.perf_counter())
            if n == 8:
                started.wait(60)
            if stop.is_set():
                break
        stream.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    started.wait(120)
    time.sleep(1.0)  # steady decoding first
    t0 = time.perf_counter()
    client.completions.create(model="bench", prompt=long_ids, max_tokens=1, temperature=0)
    t1 = time.perf_counter()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(120)
    gaps = [(b - a, a - t0) for s in stamps for a, b in zip(s, s[1:], strict=False) if b > t0 and a < t1]
    steady = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b < t0]
    gap, at = max(gaps)
    return {"max_gap_s": gap, "gap_at_s": at, "steady_gap_s": statistics.median(steady), "prefill_s": t1 - t0,
            "tokens_during": len(gaps)}  # fmt: skip


def scenario_stall(args: argparse.Namespace) -> None:
    from quantkit.quantized_model import load_any
    from quantkit.tokenizer.chat import ChatTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_folder(folder, argparse.Namespace(layers=args.stall_layers, dim=args.stall_dim))
        model = load_any(folder, device=args.device, progress=False)
        tokenizer = ChatTokenizer.from_folder(folder)
        context = model.config.text.max_seq_len
        n = min(args.long_prompt, context - 1)
        long_ids = [tokenizer.bos_id, *torch.randint(1000, 30000, (n - 1,), generator=torch.Generator().manual_seed(0))
                    .tolist()]  # fmt: skip
        print(f"model: random Mistral, {args.stall_layers} layers, dim {args.stall_dim}, context {context}; "
              f"{args.device}, {args.threads} threads; a {n}-token prompt arrives while {args.streams} streams run")
        for chunk in (0, 512):
            engine, server = served(model, tokenizer, context, prefill_chunk=chunk or None, prefix_cache=False)
            try:
                with server as url:
                    r = stall(url, args.streams, long_ids)
            finally:
                engine.close()
            how = "prefilled whole (before)" if chunk == 0 else f"--prefill-chunk {chunk} (after)"
            print(f"{how}: longest gap between tokens of a running stream {r['max_gap_s']:.2f} s (from "
                  f"{r['gap_at_s']:+.1f} s after the long prompt was sent; steady "
                  f"{r['steady_gap_s'] * 1000:.0f} ms); {r['tokens_during']} stream tokens during the prefill; "
                  f"long prompt's first token after {r['prefill_s']:.1f} s", flush=True)


def scenario_prefix(args: argparse.Namespace) -> None:
    import openai

    from quantkit.quantized_model import load_any
    from quantkit.tokenizer.chat import ChatTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or Path(tmp)
        if args.model is None:
            build_folder(folder, args)
        model = load_any(folder, device=args.device, progress=False)
        tokenizer = ChatTokenizer.from_folder(folder)
        gen = torch.Generator().manual_seed(0)
        prefix = [tokenizer.bos_id, *torch.randint(1000, 30000, (args.prefix_tokens - 1,), generator=gen).tolist()]
        endings = [torch.randint(1000, 30000, (20,), generator=gen).tolist() for _ in range(3)]
        print(f"model: {folder if args.model else 'random Mistral'}, {args.layers} layers, dim {args.dim}; "
              f"{args.device}, {args.threads} threads; a {args.prefix_tokens}-token prefix + 20 tokens, three times")
        for cache in (False, True):
            engine, server = served(model, tokenizer, model.config.text.max_seq_len, prefix_cache=cache)
            try:
                with server as url:
                    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", timeout=1200, max_retries=0)
                    ttft = []
                    for ending in endings:
                        t0 = time.perf_counter()
                        client.completions.create(model="bench", prompt=prefix + ending, max_tokens=1)
                        ttft.append(time.perf_counter() - t0)
                    cached = engine.status()["prefix_cached_tokens"]
            finally:
                engine.close()
            times = ", ".join(f"{t:.2f}" for t in ttft)
            print(f"prefix cache {'on ' if cache else 'off'}: time to first token {times} s (first, repeat, repeat); "
                  f"{cached} prompt tokens taken from the cache", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="A converted or quantized folder (default: a random Mistral).")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--requests", type=int, default=16, help="Requests per concurrency level.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a busy shared CPU).")
    p.add_argument("--scenario", choices=["throughput", "stall", "prefix"], default="throughput")
    p.add_argument("--long-prompt", type=int, default=50000, help="stall: tokens of the long prompt.")
    p.add_argument("--streams", type=int, default=4, help="stall: streams running when it arrives.")
    p.add_argument("--stall-layers", type=int, default=2)
    p.add_argument("--stall-dim", type=int, default=256)
    p.add_argument("--prefix-tokens", type=int, default=4000, help="prefix: tokens of the repeated prefix.")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.scenario != "throughput":
        return {"stall": scenario_stall, "prefix": scenario_prefix}[args.scenario](args)

    from quantkit.model.config import load_model_config
    from quantkit.quantized_model import load_any
    from quantkit.serve.app import create_app
    from quantkit.serve.engine import Engine
    from quantkit.serve.server import serve_in_thread
    from quantkit.tokenizer.chat import ChatTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp)
            build_folder(folder, args)
        model = load_any(folder, device=args.device, progress=False)
        tokenizer = ChatTokenizer.from_folder(folder)
        n_params = sum(t.numel() for t in model.parameters())
        print(f"model: {folder if args.model else 'random Mistral'}, {n_params / 1e6:.1f}M parameters, "
              f"{args.device}, {args.threads} threads")
        print(f"{args.requests} requests x up to {args.max_tokens} tokens per level")
        rows = {}
        for max_batch in BATCHES:
            engine = Engine(model, tokenizer, max_batch=max_batch)
            app = create_app(engine, "bench", load_model_config(folder).text.max_seq_len)
            try:
                with serve_in_thread(app) as url:
                    run_level(url, 1, 2, 4, "bench")  # warm-up
                    for c in LEVELS:
                        before = engine.status()
                        rows[max_batch, c] = run_level(url, c, args.requests, args.max_tokens, "bench")
                        after = engine.status()
                        steps = after["decode_steps"] - before["decode_steps"]
                        decoded = after["generated_tokens"] - before["generated_tokens"] - args.requests
                        rows[max_batch, c]["rows_per_step"] = decoded / steps if steps else 1.0
            finally:
                engine.close()
        direct = direct_tokens_per_s(model, tokenizer, args.requests, args.max_tokens)
    print(f"{'clients':>7} {'max-batch':>9} {'requests/s':>10} {'tokens/s':>9} {'TTFT p50 s':>10} {'rows/step':>9} "
          f"{'wall s':>7}")  # fmt: skip
    for c in LEVELS:
        for max_batch in BATCHES:
            r = rows[max_batch, c]
            print(f"{c:>7} {max_batch:>9} {r['requests_per_s']:>10.2f} {r['tokens_per_s']:>9.1f} "
                  f"{r['ttft_median_s']:>10.3f} {r['rows_per_step']:>9.2f} {r['wall_s']:>7.2f}")  # fmt: skip
    for c in LEVELS:
        one, batched = rows[1, c]["tokens_per_s"], rows[BATCHES[-1], c]["tokens_per_s"]
        print(f"{c} clients: --max-batch {BATCHES[-1]} gives {batched / one:.2f}x the tokens/s of --max-batch 1")
    base = rows[1, 1]["tokens_per_s"]
    print(f"generate() alone, no server, same requests one after another: {direct:.1f} tokens/s "
          f"(1 client through the --max-batch 1 server: {base / direct:.0%} of it)")

if __name__ == "__main__":
    main()

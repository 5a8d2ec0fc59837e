"""Requests/s and tokens/s of `quantkit serve` for 1, 4 and 8 concurrent streaming clients, with --max-batch 1
(one request at a time) and --max-batch 8 (batched decode) side by side, in one run.

The real server (FastAPI on uvicorn, one generation worker) runs in a background thread on a free local port with a
small random Mistral (or --model FOLDER); each level sends the same --requests greedy streaming chat requests, split
over that many client threads, through the official `openai` client. Figures: requests/s and generated tokens/s over
the level's wall time, the median time to the first token (the queue's wait as clients are added), and the mean
number of rows per decode step the batched server ran.
Run: python benchmarks/bench_serve.py [--layers 8 --dim 512 --requests 16 --max-tokens 32 --threads 1]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="A converted or quantized folder (default: a random Mistral).")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--requests", type=int, default=16, help="Requests per concurrency level.")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a busy shared CPU).")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from quantkit.model.config import load_model_config
    from quantkit.runtime import load_any
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

"""Train the quality benchmarks' model: a small Mistral LM on the Python standard library, written Mistral-native.

Perplexity and KL divergence only mean something on a model with real language statistics, and random weights
have none. Every machine has the standard library's .py files offline, so this trains on them (split into
training and held-out sets by a hash of each file's path) with the real v7m1 tokenizer, on the CPU, in a
wall-clock budget, then writes params.json + consolidated.safetensors + tokenizer.model.v7m1, so convert,
quantize, eval and run are all exercised on it. Seeded: init and data order are fixed; with --steps the run is
fully reproducible, with --minutes the step count depends on the machine's speed (train_log.json records it).

Most of a small model's compute is its 32768-row output layer, yet the training files use about 15k token ids.
So training uses compact tables over the ids that occur, plus one shared row for all the others, whose logit gets
log(their count): that is exactly the full-vocabulary softmax of a model whose unseen rows are tied, which is
what is written out (unseen embedding rows keep their random init, as full training would leave them).
Run: python benchmarks/train_bench_model.py [--minutes 20] [--out ~/.cache/quantkit-bench/bench-model] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import mistral_common
import sentencepiece
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quantkit.arch import detect_arch, model_dims
from quantkit.convert.hf_config import build_config
from quantkit.convert.keymap import expand
from quantkit.io.writer import TensorSpec, write_json, write_shard
from quantkit.model.config import ModelConfig, parse_config
from quantkit.model.load import build_model
from quantkit.model.text import Transformer

PARAMS = {
    "dim": 256, "n_layers": 4, "head_dim": 64, "hidden_dim": 768, "n_heads": 4, "n_kv_heads": 1,
    "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": 32768,
}  # fmt: skip
TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_241114.model.v7m1"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}  # not text
EVAL_ROWS, EVAL_LEN = 32, 512


def stdlib_files() -> dict[str, str]:
    """Relative path -> text of the standard library's own .py files (no tests, no installed packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8", errors="replace") for p in files}


def is_heldout(rel: str) -> bool:
    """About 1 file in 20, chosen by a hash of its path: a file lands on the same side on every machine."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0


def pack(sp: sentencepiece.SentencePieceProcessor, texts: list[str]) -> torch.Tensor:
    """BOS + tokens of each text, concatenated: the stream training windows and eval rows are cut from."""
    return torch.tensor([t for text in texts for t in [sp.bos_id(), *sp.encode(text)]], dtype=torch.int64)


def hf_model_config(params: dict) -> ModelConfig:
    """The config `quantkit convert` will write for these params, parsed for our runtime."""
    return parse_config(build_config(detect_arch(params), params, model_dims(params), dtype="bfloat16"))


def init_model(params: dict, seen: torch.Tensor, seed: int) -> Transformer:
    """Our runtime Transformer, trainable, with compact tables over the seen ids (the head has one more, shared row)."""
    torch.manual_seed(seed)
    model = build_model(hf_model_config(params), "cpu")
    model.embed_tokens = nn.Embedding(len(seen), params["dim"])
    model.lm_head = nn.Linear(params["dim"], len(seen) + 1, bias=False)
    for name, p in model.named_parameters():
        if p.dim() > 1:  # GPT-2 init: residual-output projections scaled down by depth
            scale = 1 / math.sqrt(2 * params["n_layers"]) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
            nn.init.normal_(p, std=0.02 * scale)
    return model.train().requires_grad_(True)


def compact_loss(model: Transformer, ids: torch.Tensor, n_unseen: int) -> torch.Tensor:
    """Mean next-token NLL over the full vocabulary: the shared last row stands for n_unseen tied ids."""
    logits = model(ids[:, :-1]).float()
    logits[..., -1] += math.log(n_unseen)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(hf_state: dict[str, torch.Tensor], params: dict, rows: torch.Tensor) -> float:
    """Mean NLL of the model as written (bf16-rounded, full vocabulary, fp32 math) on held-out rows of raw ids."""
    model = build_model(hf_model_config(params), "cpu")
    key = model.config.checkpoint_key
    model.load_state_dict({k: hf_state[key(k)].to(torch.bfloat16).float() for k in model.state_dict()})
    nll = sum(float(F.cross_entropy(model(r[None, :-1])[0], r[1:], reduction="sum")) for r in rows)
    return nll / (rows.shape[0] * (rows.shape[1] - 1))


def full_state(model: Transformer, params: dict, seen: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """HF-named fp32 tensors of the full-vocabulary model (compact tables scattered back; unseen head rows tied)."""
    gen = torch.Generator().manual_seed(seed + 1)
    embed = torch.randn(params["vocab_size"], params["dim"], generator=gen) * 0.02
    embed[seen] = model.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach()[-1].repeat(params["vocab_size"], 1)
    head[seen] = model.lm_head.weight.detach()[:-1]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state.update({"embed_tokens.weight": embed, "lm_head.weight": head})
    return {model.config.checkpoint_key(k): v for k, v in state.items()}


def write_native(folder: Path, params: dict, hf_state: dict[str, torch.Tensor]) -> None:
    """params.json, consolidated.safetensors (bf16, q/k rows back in native interleaved rotary order), tokenizer."""
    maps = {m.native: m for m in expand(detect_arch(params), model_dims(params))}

    def produce(spec: TensorSpec) -> torch.Tensor:
        m = maps[spec.name]
        w = hf_state[m.hf]
        if m.rope_heads:  # inverse of quantkit.convert.transforms.permute_rope
            rows, cols = w.shape
            w = w.view(m.rope_heads, 2, rows // m.rope_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
        return w.to(torch.bfloat16).contiguous()

    folder.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(m.native, "BF16", m.shape) for m in maps.values()]
    write_shard(folder / "consolidated.safetensors", specs, produce)
    write_json(folder / "params.json", params)
    shutil.copy(TOKENIZER, folder / "tokenizer.model.v7m1")


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over --warmup steps, then cosine down to 10% of --lr as progress (time or steps) goes 0 -> 1."""
    return args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "quantkit-bench" / "bench-model")
    ap.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    ap.add_argument("--steps", type=int, help="train exactly this many steps instead (reproducible)")
    ap.add_argument("--batch", type=int, default=1, help="rows per step: few tokens, so many small steps")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine, 2 threads ran slower")
    ap.add_argument("--force", action="store_true", help="retrain even if --out holds a finished model")
    args = ap.parse_args()
    out, native = args.out.expanduser(), args.out.expanduser() / "native"
    if (out / "train_log.json").is_file() and not args.force:
        print(f"bench model already trained: {native} (held-out texts {out / 'heldout.jsonl'}; --force retrains)")
        return
    torch.set_num_threads(args.threads)
    (out / "train_log.json").unlink(missing_ok=True)  # the marker of a finished model goes last

    files = stdlib_files()
    held = [rel for rel in files if is_heldout(rel)]
    train = [rel for rel in files if not is_heldout(rel)]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    stream, held_stream = pack(sp, [files[r] for r in train]), pack(sp, [files[r] for r in held])
    seen = torch.unique(stream)  # sorted ids that occur in training; compact id = position in seen
    to_compact = torch.full((PARAMS["vocab_size"],), len(seen), dtype=torch.int64)
    to_compact[seen] = torch.arange(len(seen))
    stream, n_unseen = to_compact[stream], PARAMS["vocab_size"] - len(seen)
    rows = held_stream[: EVAL_ROWS * EVAL_LEN].view(EVAL_ROWS, EVAL_LEN)
    print(f"{len(train)} training files ({len(stream):,} tokens, {len(seen):,} distinct ids), {len(held)} held out")

    model = init_model(PARAMS, seen, args.seed)
    decay = [p for p in model.parameters() if p.dim() > 1]
    other = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    loss0 = heldout_loss(full_state(model, PARAMS, seen, args.seed), PARAMS, rows)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    bar = tqdm(total=args.steps or round(budget), unit="step" if args.steps else "s", desc="training")
    start, step, ema = time.monotonic(), 0, None
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args)
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([stream[s : s + args.seq_len + 1] for s in starts.tolist()])
        loss = compact_loss(model, batch, n_unseen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1 if args.steps else round(time.monotonic() - start) - bar.n)
        tok_s = step * args.batch * args.seq_len / (time.monotonic() - start)
        bar.set_postfix(step=step, loss=f"{ema:.3f}", tok_s=f"{tok_s:.0f}")
    bar.close()
    seconds = time.monotonic() - start
    state = full_state(model, PARAMS, seen, args.seed)
    loss1 = heldout_loss(state, PARAMS, rows)
    write_native(native, PARAMS, state)
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as f:
        for rel in held:
            f.write(json.dumps({"text": files[rel], "path": rel}) + "\n")
    log = {
        "params": PARAMS, "seed": args.seed, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "steps": step, "tokens_seen": step * args.batch * args.seq_len, "seconds": round(seconds, 1),
        "train_files": len(train), "train_tokens": len(stream), "heldout_files": len(held),
        "final_train_loss": round(ema, 4), "heldout_eval": f"{EVAL_ROWS} rows x {EVAL_LEN} tokens, fp32",
        "heldout_loss_untrained": round(loss0, 4), "heldout_ppl_untrained": round(math.exp(loss0), 2),
        "heldout_loss": round(loss1, 4), "heldout_ppl": round(math.exp(loss1), 3),
    }  # fmt: skip
    write_json(out / "train_log.json", log)
    print(f"held-out perplexity {math.exp(loss0):.0f} -> {math.exp(loss1):.2f} after {step} steps; wrote {native}")


if __name__ == "__main__":
    main()

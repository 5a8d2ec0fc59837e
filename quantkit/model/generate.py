"""Token generation: preallocated KV cache, chunked prefill, greedy / temperature / top-p sampling, streaming.

Prefill runs the prompt (and the vision tower, once) in chunks so a long prompt never needs a T x T attention matrix
at once; decode then feeds one token at a time, either eagerly from Python (the CPU path) or through a DecodeStep:
fixed device buffers for the token and position, the whole static KV cache behind a mask, sampling on the device, so
on CUDA the step is captured once as a CUDA graph and replayed per token. Timings are taken around each phase (with
a CUDA synchronize) so tokens/s figures mean what they say. On GPUs the KV cache is capped by free memory, so a long
context stops generation with a message instead of an out-of-memory crash.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from quantkit.errors import QuantkitError
from quantkit.model.modules import inv_freq
from quantkit.model.text import PagedKVCache, Transformer, batch_context, layer_context, static_context

DECODE_MODES = ("auto", "eager", "static", "graph")
KV_FRACTION = 0.9  # share of a GPU's free memory (after the weights) the KV cache may take; the rest: activations
BLOCK = 16  # positions per block of a Batch's KV cache
GROW_BLOCKS = 64  # a Batch's cache grows by at least this many blocks (or a quarter of its size) at a time


@dataclass
class Sampling:
    """What to generate: how many tokens, how they are drawn, and whether CUDA decodes with the captured step."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    graph: bool = True  # on CUDA, decode with the captured step (False: eager, to compare)


@dataclass
class Generation:
    """One generate() call: prompt ids, generated ids (stop token included when hit) and phase timings."""

    input_ids: list[int]
    output_ids: list[int]
    prefill_seconds: float
    decode_seconds: float
    cache_len: int = 0  # positions the KV cache held: generation stops there (context or free memory)

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.input_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which prefill produces) per second of decoding."""
        n = len(self.output_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Next token from logits [vocab]: argmax when temperature is 0, else softmax(logits / T) cut to top-p mass."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)  # [V]
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # smallest prefix holding top_p (never empty)
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_on_device(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Next token [1] from logits [V] without leaving the device: argmax at temperature 0, else the token where a
    uniform draw u [1] lands in the cumulative distribution of softmax(logits / T) cut to its top-p mass."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    sorted_probs, order = probs.sort(descending=True)  # [V]
    if top_p < 1.0:
        sorted_probs = sorted_probs * (sorted_probs.cumsum(-1) - sorted_probs < top_p)  # never empty
    cdf = sorted_probs.cumsum(-1)  # [V]
    idx = torch.searchsorted(cdf, u * cdf[-1:], right=True).clamp_(max=cdf.shape[0] - 1)  # [1]
    return order[idx]


class DecodeStep:
    """One decode token on fixed device buffers: token [1, 1] and position [1] in, the next token out in place.

    Attention reads the whole preallocated KV cache behind a position mask and sampling happens on the device,
    so the step has fixed shapes and addresses and no host sync: with graph=True (CUDA, all layers on one device)
    it is captured once as a CUDA graph and each token is one replay. Set the buffers with start(), then call
    step(u) with a uniform draw (ignored when greedy) for each token.
    """

    def __init__(self, model: Transformer, cache_len: int, temperature: float, top_p: float, graph: bool = False):
        self.model, self.cache_len = model, cache_len
        self.temperature, self.top_p = temperature, top_p
        device = model.embed_tokens.weight.device
        t = model.config.text
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.u = torch.zeros(1, dtype=torch.float32, device=device)
        self.inv_freqs = inv_freq(t.head_dim, t.rope_theta).to(device)
        self.dtype = model.norm.weight.dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        if graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        m = self.model
        h = m.embed_tokens(self.token)  # [1, 1, D]
        ctx = static_context(m.config.text, self.pos, self.inv_freqs, self.cache_len, self.dtype)
        for layer in m.layers:
            device = layer.input_layernorm.weight.device
            h = layer(h.to(device), ctx.on(device))
        nxt = sample_on_device(m.head(h)[0, -1], self.temperature, self.top_p, self.u)  # [1]
        self.token.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        return nxt

    def _capture(self) -> None:
        """Warm up on a side stream (Triton compiles, allocator pools fill), then capture one step."""
        token, pos = self.token.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward()
        self.token.copy_(token)  # warm-up steps wrote cache slots ahead of pos: rewritten before ever being read
        self.pos.copy_(pos)

    def start(self, token: int, pos: int) -> None:
        """The last sampled token and the position it goes to."""
        self.token.fill_(token)
        self.pos.fill_(pos)

    def step(self, u: float = 0.0) -> torch.Tensor:
        """Run one token: returns the next token [1] on the device (its buffer is reused by the next step)."""
        if self.temperature > 0:
            self.u.fill_(u)
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.out


def _graph_ok(model: Transformer) -> bool:
    """CUDA graphs need every layer on one CUDA device."""
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


def cache_capacity(model: Transformer, batch: int = 1) -> int | None:
    """Most positions whose KV cache fits in free GPU memory, each layer's cache on its device; None on CPU."""
    t = model.config.text
    per_position: dict[torch.device, int] = defaultdict(int)
    for layer in model.layers:
        w = layer.input_layernorm.weight
        if w.device.type == "cuda":
            per_position[w.device] += 2 * batch * t.n_kv_heads * t.head_dim * w.element_size()
    if not per_position:
        return None
    room = {}
    for d in per_position:  # memory the caching allocator holds but does not use (e.g. the last answer's cache) is free
        room[d] = torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
    return min(int(room[d] * KV_FRACTION) // size for d, size in per_position.items())


@torch.inference_mode()
def warm_up(model: Transformer, token_id: int, lengths: Sequence[int] = (1, 64)) -> None:
    """Forward passes of the decode shape and a prefill shape, so one-off costs (Triton compilation, cuBLAS setup)
    stay out of the first answer's tokens/s."""
    for n in lengths:
        model(torch.full((1, n), token_id))
    _sync(model)


def prefill(
    model: Transformer,
    input_ids: Sequence[int],
    images: Sequence[torch.Tensor] | None = None,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Run a prompt (and its images, once) through the model in chunks, filling the KV cache's row 0; returns the
    last position's logits [V]."""
    n = len(input_ids)
    h = model.embed(torch.tensor([list(input_ids)]), images)  # [1, n, D]
    for s in range(0, n, chunk_size):
        out = model.run_layers(h[:, s : s + chunk_size], start=s)  # [1, chunk, D]
    return model.head(out[:, -1:])[0, -1]


def _sync(model: Transformer) -> None:
    """Wait for queued GPU work, so a timer measures the work and not just its launch."""
    if model.norm.weight.is_cuda:
        torch.cuda.synchronize(model.norm.weight.device)


@torch.inference_mode()
def generate(
    model: Transformer,
    input_ids: Sequence[int],
    images: Sequence[torch.Tensor] | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    chunk_size: int = 512,
    on_token: Callable[[int], None] | None = None,
    decode: str = "auto",
) -> Generation:
    """Generate up to max_new_tokens after input_ids (batch 1), stopping after a token in stop_ids.

    The KV cache is sized to the prompt plus max_new_tokens, capped at the model's context and, on GPUs, at what
    fits in free memory; a prompt that does not fit is a one-line error. on_token(id) is called as each token is
    produced (streaming). decode: "eager" (a forward per token from Python, host-side sampling), "static" (the
    DecodeStep, uncaptured), "graph" (the DecodeStep captured as a CUDA graph), or "auto": graph when the whole
    model sits on one CUDA device, else eager. The static step samples on the device with its own draws, so at
    temperature > 0 its tokens differ from the eager path's for the same seed (greedy tokens are the same).
    """
    if decode not in DECODE_MODES:
        raise QuantkitError(f"unknown decode mode {decode!r} (expected one of {', '.join(DECODE_MODES)})")
    if decode == "auto":
        decode = "graph" if _graph_ok(model) else "eager"
    if decode == "graph" and not _graph_ok(model):
        raise QuantkitError("decode mode 'graph' needs the whole model on one CUDA device")
    n = len(input_ids)
    context = model.config.text.max_seq_len
    if n == 0:
        raise QuantkitError("the prompt is empty")
    if n > context:
        raise QuantkitError(f"the prompt is {n} tokens, longer than the model's context of {context} tokens")
    if max_new_tokens < 1:
        raise QuantkitError("max_new_tokens must be at least 1")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    total = min(n + max_new_tokens, context)
    room = cache_capacity(model)
    if room is not None and room < n:
        raise QuantkitError(f"the KV cache of a {n}-token prompt does not fit in free GPU memory (room for {room})")
    total = min(total, room) if room is not None else total
    stop = set(stop_ids)
    model.setup_caches(1, total)
    try:
        _sync(model)
        t0 = time.perf_counter()
        token = sample(prefill(model, input_ids, images, chunk_size), temperature, top_p, generator)
        _sync(model)
        t1 = time.perf_counter()
        output = [token]
        if on_token:
            on_token(token)
        pos = n
        stepper = None
        if decode != "eager" and token not in stop and len(output) < max_new_tokens and pos < total:
            stepper = DecodeStep(model, total, temperature, top_p, graph=decode == "graph")
            stepper.start(token, pos)
        while token not in stop and len(output) < max_new_tokens and pos < total:
            if stepper is not None:
                u = float(torch.rand(1, generator=generator)) if temperature > 0 else 0.0
                token = int(stepper.step(u))  # the one host sync per token: streaming and stop tokens need it
            else:
                logits = model(torch.tensor([[token]]), start=pos)  # [1, 1, V]
                token = sample(logits[0, -1], temperature, top_p, generator)
            pos += 1
            output.append(token)
            if on_token:
                on_token(token)
        _sync(model)
        t2 = time.perf_counter()
    finally:
        model.clear_caches()
    return Generation(list(input_ids), output, t1 - t0, t2 - t1, total)


def stop_note(model: Transformer, result: Generation, sampling: Sampling, stop_ids: set[int]) -> str:
    """Why an answer ended before max_new_tokens without an end token: the context, or the KV cache memory allows."""
    n_out = len(result.output_ids)
    if n_out >= sampling.max_new_tokens or result.output_ids[-1] in stop_ids:
        return ""
    context = model.config.text.max_seq_len
    if result.cache_len >= context:
        return f", stopped at the context of {context} tokens"
    return f", stopped at {result.cache_len} tokens: the KV cache that fits in free GPU memory"


def kv_token_bytes(model: Transformer) -> int:
    """Bytes of KV cache one position takes (keys and values of every layer)."""
    t = model.config.text
    return sum(2 * t.n_kv_heads * t.head_dim * layer.input_layernorm.weight.element_size() for layer in model.layers)


class Prefixes:
    """Token sequences an answer must open with, one of them (a forced tool call): which ids may come next."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.sequences = [list(s) for s in sequences if s]

    def allowed(self, done: Sequence[int]) -> list[int] | None:
        """The ids allowed after `done` (the answer so far); None once a whole sequence is done (free from there)."""
        n, done = len(done), list(done)
        live = [s for s in self.sequences if s[:n] == done[: len(s)]]
        if not live or any(len(s) <= n for s in live):
            return None
        return sorted({s[n] for s in live})


@dataclass
class Row:
    """One request in a Batch: its slot and KV cache blocks, its prompt and tokens so far, how it samples and stops."""

    row: int
    input_ids: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    total: int  # positions it may fill: prompt plus max_new_tokens, capped by the context and the KV budget
    generator: torch.Generator | None
    output_ids: list[int]
    prefixes: Prefixes | None = None  # the answer must open with one of these sequences
    images: list[torch.Tensor] = field(default_factory=list)
    features: torch.Tensor | None = None  # the images' projected features, computed at the first prefill chunk
    blocks: list[int] = field(default_factory=list)  # its KV cache blocks, in position order
    written: int = 0  # positions whose keys and values are in its blocks
    cached: int = 0  # of those, positions taken from the prefix cache
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    preempted: int = 0  # times its blocks were taken back for older requests (it prefills again)

    @property
    def tokens(self) -> list[int]:
        """The ids whose keys and values the cache must hold before the next decode step."""
        return self.input_ids + self.output_ids[:-1]

    @property
    def pos(self) -> int:
        """Where the last token goes (it has not been run through the model yet)."""
        return len(self.input_ids) + len(self.output_ids) - 1

    @property
    def prefilling(self) -> bool:
        """Its prompt (or, after a preemption, prompt and answer so far) is not all in the cache yet."""
        return not self.output_ids or self.written < self.pos

    @property
    def done(self) -> bool:
        return bool(self.output_ids) and (self.output_ids[-1] in self.stop_ids or self.pos >= self.total
                                          or len(self.output_ids) >= self.sampling.max_new_tokens)  # fmt: skip


class Batch:
    """Continuous batching over a paged KV cache: requests join (admit), are prefilled chunk by chunk (prefill) and
    leave (remove) between decode steps; each step runs every decoding request's last token as one [B, 1] forward,
    each row at its own position behind its own mask, and samples each row as generate() does (same host-side
    sampling, own seed). So a request's tokens are those generate() gives it alone, whatever else is in the batch
    (greedy: exactly; the linears see B rows instead of one).

    The cache is blocks of BLOCK positions shared by all rows (PagedKVCache): a request holds the blocks its tokens
    fill, so memory follows the tokens in use, not the context; the pool grows by chunks up to max_tokens (None: no
    cap on the CPU, free memory on GPUs) and is freed by close(). When it is full, a request that needs a block
    takes the blocks of the youngest requests (preempted: they prefill again later, their tokens kept), or waits.
    With prefix_cache, full blocks of finished prompts (no images) stay until their room is needed, and a prompt
    that starts with the same tokens uses them instead of computing them again.
    """

    def __init__(self, model: Transformer, max_batch: int, chunk_size: int = 512, max_tokens: int | None = None,
                 prefix_cache: bool = False):  # fmt: skip
        self.model, self.max_batch, self.chunk_size = model, max_batch, chunk_size
        self.max_blocks = None if max_tokens is None else max_tokens // BLOCK
        self.prefix_cache = prefix_cache
        self.device = model.embed_tokens.weight.device
        t = model.config.text
        self.inv_freqs = inv_freq(t.head_dim, t.rope_theta).to(self.device)
        self.dtype = model.norm.weight.dtype
        self.rows: list[Row] = []
        self.free = list(range(max_batch))
        self.steps = self.batched_steps = 0  # decode steps, and those with more than one row
        self.preemptions = 0
        self._reset()

    def _reset(self) -> None:
        self.n_blocks = 0  # blocks in the pool
        self.cache_len = 0  # the most positions a row of this cache may fill
        self.free_blocks: list[int] = []  # a heap: the lowest free block first
        self.refs: dict[int, int] = {}  # block -> rows holding it
        self.by_hash: dict[bytes, int] = {}  # prefix-cache key -> block
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no row holds, least recently used first

    @property
    def max_tokens(self) -> int | None:
        return None if self.max_blocks is None else self.max_blocks * BLOCK

    @property
    def used_blocks(self) -> int:
        return len(self.refs)

    @property
    def cached_blocks(self) -> int:
        return len(self.evictable)

    def room(self) -> int | None:
        """Blocks a request could still get: free, grown or evicted (None: no cap)."""
        cap = self._cap()
        return None if cap is None else cap - self.used_blocks

    def _cap(self) -> int | None:
        if self.max_blocks is not None:
            return self.max_blocks
        room = cache_capacity(self.model)
        return None if room is None else self.n_blocks + room // BLOCK

    def fits(self, n: int) -> bool:
        """Whether a free slot and room for an n-token prompt are there now."""
        room = self.room()
        return bool(self.free) and (room is None or room >= -(-n // BLOCK))

    def _grow(self, need: int) -> None:
        """Grow the pool by at least `need` blocks as far as the cap allows (by chunks: a quarter of its size or
        GROW_BLOCKS, whichever is more, so a long prompt copies the pool a few times, not once per block)."""
        cap = self._cap()
        new = self.n_blocks + max(need, self.n_blocks // 4, GROW_BLOCKS)
        new = new if cap is None else min(new, cap)
        if new <= self.n_blocks:
            return
        t = self.model.config.text
        for layer in self.model.layers:
            attn, w = layer.self_attn, layer.input_layernorm.weight
            if isinstance(attn.kv_cache, PagedKVCache):
                attn.kv_cache.grow(new)
            else:
                attn.kv_cache = PagedKVCache(new, BLOCK, t.n_kv_heads, t.head_dim, w.dtype, w.device)
        for b in range(self.n_blocks, new):
            heapq.heappush(self.free_blocks, b)
        self.n_blocks = new

    def _take(self, row: Row, n: int) -> bool:
        """Give row n more blocks: free ones, then cached prefixes (least recently used first), then a grown pool
        (so memory follows the tokens in use); False if there are not n."""
        while len(self.free_blocks) < n and self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
            heapq.heappush(self.free_blocks, block)
        if len(self.free_blocks) < n:
            self._grow(n - len(self.free_blocks))
        if len(self.free_blocks) < n:
            return False
        for _ in range(n):
            block = heapq.heappop(self.free_blocks)
            self.refs[block] = 1
            row.blocks.append(block)
        return True

    def _reserve(self, row: Row, end: int) -> bool:
        """Blocks for row's positions up to end, taking them from younger rows if need be; False: it must wait."""
        need = -(-end // BLOCK) - len(row.blocks)
        if need <= 0 or self._take(row, need):
            return True
        for victim in reversed(self.rows[self.rows.index(row) + 1 :]):
            if victim.blocks:
                self._release(victim)
                victim.written = victim.cached = 0
                victim.preempted += 1
                self.preemptions += 1
                if self._take(row, need):
                    return True
        return False

    def _release(self, row: Row) -> None:
        """Give back row's blocks: full ones of a cacheable row are kept for the prefix cache."""
        self._register(row)
        for block in row.blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                del self.refs[block]
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    heapq.heappush(self.free_blocks, block)
        row.blocks = []

    def _cacheable(self, row: Row) -> bool:
        return self.prefix_cache and not row.images

    def _hashes(self, row: Row, n_blocks: int) -> list[bytes]:
        """Prefix-cache keys of row's first n_blocks full blocks: each hashes the one before it and its ids."""
        tokens = row.input_ids + row.output_ids
        while len(row.hashes) < n_blocks:
            i = len(row.hashes)
            ids = tokens[i * BLOCK : (i + 1) * BLOCK]
            parent = row.hashes[-1] if row.hashes else b""
            row.hashes.append(hashlib.sha256(parent + b",".join(str(t).encode() for t in ids)).digest())
        return row.hashes[:n_blocks]

    def _register(self, row: Row) -> None:
        """Offer row's written full blocks to the prefix cache."""
        if not self._cacheable(row):
            return
        for key, block in zip(self._hashes(row, row.written // BLOCK), row.blocks, strict=False):
            if key not in self.by_hash and block not in self.hash_of:
                self.by_hash[key], self.hash_of[block] = block, key

    def _lookup(self, row: Row) -> None:
        """Start row from cached blocks of the same leading tokens (all but its last prompt token)."""
        if not self._cacheable(row):
            return
        for key in self._hashes(row, (len(row.tokens) - 1) // BLOCK):
            block = self.by_hash.get(key)
            if block is None:
                break
            self.evictable.pop(block, None)
            self.refs[block] = self.refs.get(block, 0) + 1
            row.blocks.append(block)
        row.written = row.cached = len(row.blocks) * BLOCK

    def admit(self, input_ids: Sequence[int], images: Sequence[torch.Tensor] | None, sampling: Sampling,
              stop_ids: Sequence[int] = (), prefixes: Prefixes | None = None) -> Row:  # fmt: skip
        """Give a request a free row; prefill() then fills its cache (check .prefilling and .done)."""
        n, context = len(input_ids), self.model.config.text.max_seq_len
        if not self.free:
            raise QuantkitError(f"the batch already holds {self.max_batch} requests")
        if n == 0:
            raise QuantkitError("the prompt is empty")
        if n > context:
            raise QuantkitError(f"the prompt is {n} tokens, longer than the model's context of {context} tokens")
        if self.max_tokens is not None and n > self.max_tokens:
            raise QuantkitError(f"the prompt is {n} tokens, more than the KV cache budget of {self.max_tokens}")
        if sampling.max_new_tokens < 1:
            raise QuantkitError("max_new_tokens must be at least 1")
        total = min(n + sampling.max_new_tokens, context, self.max_tokens or context)
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        row = Row(self.free.pop(0), list(input_ids), sampling, frozenset(stop_ids), total, generator, [], prefixes,
                  list(images or []))  # fmt: skip
        self.rows.append(row)
        self.cache_len = max(self.cache_len, total)
        return row

    def add(self, input_ids: Sequence[int], images: Sequence[torch.Tensor] | None, sampling: Sampling,
            stop_ids: Sequence[int] = (), prefixes: Prefixes | None = None) -> Row:  # fmt: skip
        """Admit a request and prefill it whole; its first token is in output_ids (check .done before stepping)."""
        row = self.admit(input_ids, images, sampling, stop_ids, prefixes)
        try:
            if not self.prefill(row):
                raise QuantkitError(f"no room in the KV cache for a {len(row.input_ids)}-token prompt now")
        except BaseException:
            self.remove(row)
            raise
        return row

    @torch.inference_mode()
    def prefill(self, row: Row, max_tokens: int | None = None) -> bool:
        """Put up to max_tokens (None: all) more of row's tokens in the cache, in chunks of chunk_size; when the
        prompt is in, sample its first token. True when the row is ready to decode; False when it still prefills
        (max_tokens reached, or no block is free: it waits for older requests)."""
        m, tokens = self.model, row.tokens
        if row.written == 0 and not row.blocks:
            self._lookup(row)
        if row.images and row.features is None:
            row.features = m.image_features(row.images)  # [N, D]
            slots = sum(t == m.config.image_token_id for t in row.input_ids)
            if slots != row.features.shape[0]:
                raise QuantkitError(f"the prompt has {slots} image tokens but the images give {row.features.shape[0]}")
        end = len(tokens) if max_tokens is None else min(len(tokens), row.written + max_tokens)
        h = None
        while row.written < end:
            start = row.written
            stop = min(end, start + self.chunk_size)
            if not self._reserve(row, stop):
                return False
            ids = torch.tensor([tokens[start:stop]], device=self.device)  # [1, T]
            if row.features is not None:
                done = sum(t == m.config.image_token_id for t in tokens[:start])
                h = m.embed(ids, features=row.features[done : done + int((ids == m.config.image_token_id).sum())])
            else:
                h = m.embed_tokens(ids)  # [1, T, D]
            ctx = layer_context(m.config.text, start, stop - start, h.dtype, h.device)
            positions = range(start, stop)
            slots = [row.blocks[p // BLOCK] * BLOCK + p % BLOCK for p in positions]
            table = row.blocks[: -(-stop // BLOCK)]
            ctx = replace(ctx, slots=torch.tensor(slots, device=self.device),
                          table=torch.tensor([table], device=self.device))  # fmt: skip
            for layer in m.layers:
                h = layer(h.to(layer.input_layernorm.weight.device), ctx.on(layer.input_layernorm.weight.device))
            row.written = stop
        if row.written < len(tokens):
            return False
        if not row.output_ids:
            if h is None:  # cannot happen: the prefix cache always leaves the last prompt token to run
                raise QuantkitError("nothing of the prompt was run")
            row.output_ids.append(self._pick(row, m.head(h[:, -1:])[0, -1]))
            self._register(row)
        return True

    def _pick(self, row: Row, logits: torch.Tensor) -> int:
        """The row's next token from its logits [V]: sampled as generate() does, among the allowed ids if forced."""
        allowed = row.prefixes.allowed(row.output_ids) if row.prefixes is not None else None
        if allowed is not None:
            if len(allowed) == 1:
                return allowed[0]
            keep = torch.tensor(allowed, device=logits.device)
            logits = torch.full_like(logits, float("-inf")).index_copy_(0, keep, logits[keep])
        s = row.sampling
        return sample(logits, s.temperature, s.top_p, row.generator)

    @torch.inference_mode()
    def remove(self, row: Row) -> None:
        """The request leaves: its blocks go back (full ones to the prefix cache) and its slot is free."""
        if row.blocks:
            self._release(row)
        self.rows.remove(row)
        self.free.append(row.row)
        self.free.sort()

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One decode token for every prefilled row that is not done (and has, or can get, a block for it);
        returns those rows (each with one more output id)."""
        rows = []
        for r in [r for r in self.rows if not r.prefilling and not r.done]:  # oldest first: they may preempt
            if not r.prefilling and self._reserve(r, r.pos + 1):  # (a row preempted just now prefills again)
                rows.append(r)
        if not rows:
            return []
        m = self.model
        key_len = max(r.pos for r in rows) + 1
        width = -(-key_len // BLOCK)
        tokens = torch.tensor([[r.output_ids[-1]] for r in rows], device=self.device)  # [B, 1]
        pos = torch.tensor([r.pos for r in rows], device=self.device)  # [B]
        ctx = batch_context(m.config.text, pos, self.inv_freqs, key_len, self.dtype)
        slots = [r.blocks[r.pos // BLOCK] * BLOCK + r.pos % BLOCK for r in rows]
        table = [r.blocks[:width] + [0] * (width - len(r.blocks[:width])) for r in rows]  # padding: masked
        ctx = replace(ctx, slots=torch.tensor(slots, device=self.device),
                      table=torch.tensor(table, device=self.device))  # fmt: skip
        h = m.embed_tokens(tokens)  # [B, 1, D]
        for layer in m.layers:
            device = layer.input_layernorm.weight.device
            h = layer(h.to(device), ctx.on(device))
        logits = m.head(h)[:, -1]  # [B, V]
        for i, r in enumerate(rows):
            r.written = r.pos + 1
            r.output_ids.append(self._pick(r, logits[i]))
        self.steps += 1
        self.batched_steps += len(rows) > 1
        return rows

    def release_idle(self) -> None:
        """With no request left, free the cache's memory unless it holds prefixes to reuse."""
        if not self.rows and not self.evictable:
            self.close()

    def close(self) -> None:
        """Free the KV cache (the prefix cache with it)."""
        self.model.clear_caches()
        self._reset()

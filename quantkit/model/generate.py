"""Token generation: preallocated KV cache, chunked prefill, greedy / temperature / top-p sampling, streaming.

Prefill runs the prompt (and the vision tower, once) in chunks so a long prompt never needs a T x T attention matrix
at once; decode then feeds one token at a time, either eagerly from Python (the CPU path) or through a DecodeStep:
fixed device buffers for the token and position, the whole static KV cache behind a mask, sampling on the device, so
on CUDA the step is captured once as a CUDA graph and replayed per token. Timings are taken around each phase (with
a CUDA synchronize) so tokens/s figures mean what they say. On GPUs the KV cache is capped by free memory, so a long
context stops generation with a message instead of an out-of-memory crash.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.model.modules import inv_freq
from quantkit.model.text import Transformer, batch_context, static_context

DECODE_MODES = ("auto", "eager", "static", "graph")
KV_FRACTION = 0.9  # share of a GPU's free memory (after the weights) the KV cache may take; the rest: activations


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
    row: int | None = None,
) -> torch.Tensor:
    """Run a prompt (and its images, once) through the model in chunks, filling the KV cache (its row `row` if
    given, else row 0); returns the last position's logits [V]."""
    n = len(input_ids)
    rows = None if row is None else torch.tensor([row], device=model.embed_tokens.weight.device)
    h = model.embed(torch.tensor([list(input_ids)]), images)  # [1, n, D]
    for s in range(0, n, chunk_size):
        out = model.run_layers(h[:, s : s + chunk_size], start=s, rows=rows)  # [1, chunk, D]
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


@dataclass
class Row:
    """One request in a Batch: its KV cache row, its prompt and tokens so far, and how it samples and stops."""

    row: int
    input_ids: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    total: int  # positions it may fill: prompt plus max_new_tokens, capped by the context and the cache
    generator: torch.Generator | None
    output_ids: list[int]

    @property
    def pos(self) -> int:
        """Where the last token goes (it has not been run through the model yet)."""
        return len(self.input_ids) + len(self.output_ids) - 1

    @property
    def done(self) -> bool:
        return (self.output_ids[-1] in self.stop_ids or len(self.output_ids) >= self.sampling.max_new_tokens
                or self.pos >= self.total)  # fmt: skip


class Batch:
    """Continuous batching: requests join (prefilled alone into a free row of a shared KV cache) and leave between
    decode steps; each step runs every active request's last token as one [B, 1] forward, each row at its own
    position behind its own mask, and samples each row as generate() does (same host-side sampling, own seed).

    So a request's tokens are those generate() gives it alone, whatever else is in the batch (greedy: exactly; the
    linears see B rows instead of one). The cache has max_batch rows and grows in length when a longer request
    joins (capped by the context and, on GPUs, by free memory); close() frees it.
    """

    def __init__(self, model: Transformer, max_batch: int, chunk_size: int = 512):
        self.model, self.max_batch, self.chunk_size = model, max_batch, chunk_size
        self.device = model.embed_tokens.weight.device
        t = model.config.text
        self.inv_freqs = inv_freq(t.head_dim, t.rope_theta).to(self.device)
        self.dtype = model.norm.weight.dtype
        self.cache_len = 0
        self.rows: list[Row] = []
        self.free = list(range(max_batch))
        self.steps = self.batched_steps = 0  # decode steps, and those with more than one row

    def _grow(self, need: int) -> int:
        """Make the cache hold at least need positions per row if it can; returns the length it holds."""
        if need <= self.cache_len:
            return self.cache_len
        room = cache_capacity(self.model, self.max_batch)
        new = need if room is None else min(need, room)  # the old cache is still there while the new one fills
        if self.cache_len == 0:
            self.model.setup_caches(self.max_batch, new)
        elif new > self.cache_len:
            for layer in self.model.layers:
                layer.self_attn.kv_cache.resize(new)
        self.cache_len = max(self.cache_len, new)
        return self.cache_len

    @torch.inference_mode()
    def add(self, input_ids: Sequence[int], images: Sequence[torch.Tensor] | None, sampling: Sampling,
            stop_ids: Sequence[int] = ()) -> Row:  # fmt: skip
        """Prefill a request into a free row; its first token is in output_ids (check .done before stepping)."""
        n, context = len(input_ids), self.model.config.text.max_seq_len
        if not self.free:
            raise QuantkitError(f"the batch already holds {self.max_batch} requests")
        if n == 0:
            raise QuantkitError("the prompt is empty")
        if n > context:
            raise QuantkitError(f"the prompt is {n} tokens, longer than the model's context of {context} tokens")
        if sampling.max_new_tokens < 1:
            raise QuantkitError("max_new_tokens must be at least 1")
        held = self._grow(min(n + sampling.max_new_tokens, context))
        if held < n:
            raise QuantkitError(f"the KV cache of a {n}-token prompt does not fit in free GPU memory "
                                f"(room for {held})")  # fmt: skip
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        row = Row(self.free[0], list(input_ids), sampling, frozenset(stop_ids),
                  min(n + sampling.max_new_tokens, context, held), generator, [])  # fmt: skip
        logits = prefill(self.model, input_ids, images, self.chunk_size, row=row.row)
        row.output_ids.append(sample(logits, sampling.temperature, sampling.top_p, generator))
        self.free.pop(0)
        self.rows.append(row)
        return row

    @torch.inference_mode()
    def remove(self, row: Row) -> None:
        """The request leaves: its cache row is zeroed (see KVCache) and free for the next one."""
        self.rows.remove(row)
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k[row.row].zero_()
            cache.v[row.row].zero_()
        self.free.append(row.row)
        self.free.sort()

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One decode token for every row that is not done; returns those rows (each with one more output id)."""
        rows = [r for r in self.rows if not r.done]
        if not rows:
            return []
        m = self.model
        tokens = torch.tensor([[r.output_ids[-1]] for r in rows], device=self.device)  # [B, 1]
        pos = torch.tensor([r.pos for r in rows], device=self.device)  # [B]
        index = torch.tensor([r.row for r in rows], device=self.device)  # [B]
        ctx = batch_context(m.config.text, pos, index, self.inv_freqs, max(r.pos for r in rows) + 1, self.dtype)
        h = m.embed_tokens(tokens)  # [B, 1, D]
        for layer in m.layers:
            device = layer.input_layernorm.weight.device
            h = layer(h.to(device), ctx.on(device))
        logits = m.head(h)[:, -1]  # [B, V]
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            s = r.sampling
            token = greedy[i] if s.temperature <= 0 else sample(logits[i], s.temperature, s.top_p, r.generator)
            r.output_ids.append(token)
        self.steps += 1
        self.batched_steps += len(rows) > 1
        return rows

    def close(self) -> None:
        """Free the KV cache."""
        self.model.clear_caches()
        self.cache_len = 0

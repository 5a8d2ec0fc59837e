"""The generation worker thread fed by a queue: requests are decoded together, up to max_batch at a time
(continuous batching over quantkit.model.generate.Batch and its paged KV cache).

Each loop of the worker admits waiting requests while there is a free row and KV cache room for their prompt (the
others wait, in order), runs one prefill chunk of the oldest request still prefilling (so a long prompt is spread
over many loops and running streams keep getting tokens), then one decode step of every request that has its
prompt in. Each job streams events back to its request (text deltas, then a finish event) through a thread-safe
sink. Stop strings and cancellation are checked on each new token; a finished or cancelled request leaves the batch
and its KV cache blocks go back to the pool (full prompt blocks stay as a prefix cache until their room is needed),
which the worker counts, so /health can show that a client that went away really stopped its generation.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantkit.errors import QuantkitError
from quantkit.model.generate import BLOCK, Batch, Prefixes, Row, Sampling
from quantkit.model.text import Transformer
from quantkit.tokenizer.chat import ChatTokenizer

log = logging.getLogger("quantkit.serve")
Event = tuple  # ("first", id) | ("text", delta) | ("done", Usage) | ("error", message, status)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    output_ids: list[int]  # every generated id, the end token included when hit (as `quantkit run --json`)
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length"


@dataclass
class Job:
    input_ids: list[int]
    images: list[torch.Tensor]
    sampling: Sampling
    emit: Callable[[Event], None]  # called from the worker thread; must be thread-safe
    stop: list[str] = field(default_factory=list)
    id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    prefixes: Prefixes | None = None  # the answer must open with one of these token sequences (a forced tool call)

    def cancel(self) -> None:
        self.cancelled.set()


class Busy(Exception):
    """The queue is full."""


class TextState:
    """The answer's text as ids arrive: finds stop strings and holds back text that may be the start of one, so a
    stream never shows a stop string; decodes all ids each time so multi-byte characters appear whole."""

    def __init__(self, tokenizer: ChatTokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.generated: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already emitted
        self.hit_stop = False

    def add(self, token: int, is_end: bool) -> str:
        """Take one generated id; returns the text that can be emitted now."""
        self.generated.append(token)
        if is_end:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.hit_stop = text[: min(hits)], True
            return self._emit(len(self.text))
        self.text = text
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(len(text) - hold)

    def finish(self) -> str:
        """The rest of the text at the end (held-back characters, an incomplete character)."""
        if not self.hit_stop:
            self.text = self.tokenizer.decode(self.ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


@dataclass
class _Active:
    """A job in the batch: its row there, its text so far, when it was submitted, admitted and got its first token."""

    job: Job
    row: Row
    state: TextState
    t_submit: float
    t_admit: float
    t_first: float | None = None


class Engine:
    """Answers jobs on a worker thread, up to max_batch decoded together; counts what happened for /health.

    kv_tokens caps the KV cache (positions of all requests together; None: no cap on the CPU, free memory on GPUs);
    prefill_chunk is the most prompt tokens prefilled between two decode steps (fewer deep in a long prompt, so a
    chunk costs about the same anywhere; None: a joining prompt is prefilled whole before the next step)."""

    def __init__(self, model: Transformer, tokenizer: ChatTokenizer, max_queue: int = 64, max_batch: int = 8,
                 kv_tokens: int | None = None, prefill_chunk: int | None = 512, prefix_cache: bool = True):  # fmt: skip
        if max_batch < 1:
            raise QuantkitError("max_batch must be at least 1")
        self.model, self.tokenizer, self.max_queue, self.max_batch = model, tokenizer, max_queue, max_batch
        self.prefill_chunk = prefill_chunk
        self.end_ids = set(tokenizer.stop_ids)
        self.batch = Batch(model, max_batch, max_tokens=kv_tokens, prefix_cache=prefix_cache)
        self._queue: queue.Queue[tuple[Job, float] | None] = queue.Queue()  # (job, when it came)
        self._waiting: deque[tuple[Job, float]] = deque()  # taken from the queue, not admitted yet (worker only)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = dict(completed=0, cancelled=0, failed=0, generated_tokens=0, kv_caches_freed=0, decode_steps=0,
                          batched_steps=0, max_batch_seen=0, prefill_chunks=0, prefix_cached_tokens=0)  # fmt: skip
        self.running: str | None = None
        self._active: list[_Active] = []
        self._thread = threading.Thread(target=self._work, name="quantkit-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        if self._queue.qsize() + len(self._waiting) >= self.max_queue:
            raise Busy(f"{self.max_queue} requests are already waiting")
        job.id = job.id or f"job-{next(self._ids)}"
        self._queue.put((job, time.perf_counter()))
        return job

    def status(self) -> dict:
        b = self.batch
        with self._lock:
            return {**self.stats, "queued": self._queue.qsize() + len(self._waiting), "running": self.running,
                    "kv_cache_allocated": self.kv_cache_allocated(), "max_batch": self.max_batch,
                    "kv_cache_budget_tokens": b.max_tokens, "kv_cache_pool_tokens": b.n_blocks * BLOCK,
                    "kv_cache_used_tokens": b.used_blocks * BLOCK, "prefix_cache_tokens": b.cached_blocks * BLOCK,
                    "preempted": b.preemptions}  # fmt: skip

    def kv_cache_allocated(self) -> bool:
        """Whether a request holds KV cache blocks (the pool itself may stay, holding cached prefixes)."""
        return self.batch.used_blocks > 0

    def close(self, timeout: float = 30) -> None:
        """Cancel the running jobs and the waiting ones, then stop the worker."""
        for a in list(self._active):
            a.job.cancel()
        self._queue.put(None)
        self._thread.join(timeout)

    def _count(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self.stats[k] += v

    def _work(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(block=not (self._waiting or self._active))
                while True:
                    if item is None:
                        stopping = True
                        break
                    self._waiting.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if stopping:
                break
            try:
                self._admit()
                self._prefill()
                self._decode()
            except Exception as e:  # a bug outside the model: fail what is in the batch, keep the worker alive
                log.exception("the batch failed")
                self._fail(list(self._active), e)
            if not self._active:
                self.batch.release_idle()
        for a in list(self._active):
            a.job.cancel()
            self._leave(a, cancelled=1, generated_tokens=len(a.state.generated))
        for job, _ in self._waiting:
            job.cancel()
            job.emit(("error", "the server is shutting down", 503))
        self.batch.close()

    def _admit(self) -> None:
        """Give waiting jobs a row, in order, while there is a free row and room for the next one's prompt."""
        while self._waiting:
            job, t_submit = self._waiting[0]
            if job.cancelled.is_set():
                self._waiting.popleft()
                self._count(cancelled=1)
                log.info("%s cancelled before it started", job.id)
                continue
            if not self.batch.free or (self._active and not self.batch.fits(len(job.input_ids))):
                return  # waits for a row, or for blocks the running requests will give back
            self._waiting.popleft()
            try:
                row = self.batch.admit(job.input_ids, job.images or None, job.sampling, sorted(self.end_ids),
                                       job.prefixes)  # fmt: skip
            except QuantkitError as e:
                self._count(failed=1)
                job.emit(("error", str(e), 400))
                continue
            self._active.append(_Active(job, row, TextState(self.tokenizer, job.stop), t_submit, time.perf_counter()))
            self.running = ", ".join(a.job.id for a in self._active)

    def _prefill(self) -> None:
        """One chunk of the oldest request still prefilling (all of every one with prefill_chunk None)."""
        for a in [a for a in self._active if a.row.prefilling]:
            if a.job.cancelled.is_set():
                self._take(a)
                continue
            limit = None if self.prefill_chunk is None else self._chunk(a.row.written)
            try:
                ready = self.batch.prefill(a.row, limit)
            except Exception as e:  # a bad prompt (400), or a bug or an out-of-memory (500): the server keeps serving
                self._fail([a], e)
                continue
            self._count(prefill_chunks=1)
            if ready and a.t_first is None:
                self._count(prefix_cached_tokens=a.row.cached)
                self._take(a)
            if self.prefill_chunk is not None:
                return

    def _chunk(self, written: int) -> int:
        """Prompt tokens for the next chunk: prefill_chunk, fewer once the prompt is past 8 chunks (attention then
        costs most, growing with the length), so each chunk delays the running streams about the same."""
        n = self.prefill_chunk
        return max(64, min(n, n * 8 * n // max(written + n, 1)))

    def _decode(self) -> None:
        """One decode step of the requests whose prompt is in; then each one's new token."""
        for a in [a for a in self._active if a.job.cancelled.is_set()]:
            self._take(a)
        if not any(not a.row.prefilling and not a.row.done for a in self._active):
            return
        try:
            rows = self.batch.step()
        except Exception as e:  # a bug or an out-of-memory: these requests fail, the server keeps serving
            log.exception("a batched decode step failed")
            self._fail([a for a in self._active if not a.row.prefilling], e)
            return
        if not rows:
            return
        self._count(decode_steps=1, batched_steps=int(len(rows) > 1))
        with self._lock:
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(rows))
        stepped = {id(r) for r in rows}
        for a in [a for a in self._active if id(a.row) in stepped]:
            self._take(a)

    def _fail(self, failed: list[_Active], e: Exception) -> None:
        """These requests end with an error: a 400 for a bad prompt, else a 500 (the cause logged)."""
        for a in failed:
            if a in self._active:
                self._leave(a, failed=1)
            if isinstance(e, QuantkitError):
                a.job.emit(("error", str(e), 400))
            else:
                if len(failed) == 1:
                    log.exception("%s failed", a.job.id)
                a.job.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))

    def _take(self, a: _Active) -> None:
        """The row's newest token: stream its text, and let the job leave on cancel, stop string or the end."""
        job, state = a.job, a.state
        if job.cancelled.is_set():
            n = len(state.generated)
            self._leave(a, cancelled=1, generated_tokens=n)
            log.info("%s cancelled after %d tokens (client gone); its KV cache blocks freed", job.id, n)
            return
        token = a.row.output_ids[-1]
        delta = state.add(token, token in self.end_ids)
        if len(state.generated) == 1:
            a.t_first = time.perf_counter()
            job.emit(("first", token))
        if delta:
            job.emit(("text", delta))
        if not (state.hit_stop or a.row.done):
            return
        n = len(state.generated)
        delta = state.finish()
        if delta:
            job.emit(("text", delta))
        self._leave(a, completed=1, generated_tokens=n)
        ended = state.hit_stop or state.generated[-1] in self.end_ids
        usage = Usage(len(job.input_ids), n, state.generated, state.text, "stop" if ended else "length")
        now, row = time.perf_counter(), a.row
        log.info("%s: %d prompt (%d from the prefix cache) + %d tokens; queued %.2f s, prefill %.2f s, decode %.2f s"
                 "%s", job.id, len(job.input_ids), row.cached, n, a.t_admit - a.t_submit, a.t_first - a.t_admit,
                 now - a.t_first, f", preempted {row.preempted}x" if row.preempted else "")  # fmt: skip
        job.emit(("done", usage))

    def _leave(self, a: _Active, **counts: int) -> None:
        """Take a job out of the batch (its KV cache blocks go back to the pool), then count it."""
        if a.row in self.batch.rows:
            self.batch.remove(a.row)
        self._active.remove(a)
        self.running = ", ".join(x.job.id for x in self._active) or None
        self._count(**counts, kv_caches_freed=1)

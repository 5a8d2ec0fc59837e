"""The generation worker thread fed by a queue: requests are decoded together in a batch (max_batch > 1) or
answered one at a time with quantkit's generate() (max_batch 1).

Batched: each request is prefilled alone into its own row of a shared KV cache, then every decode step runs all
active requests as one forward (quantkit.model.generate.Batch); requests join and leave between steps. Each job
streams events back to its request (text deltas, then a finish event) through a thread-safe sink. Stop strings and
cancellation are checked on each new token; a finished or cancelled request leaves the batch and its cache row is
freed (the whole cache once the batch is empty), which the worker counts, so /health can show that a client that
went away really stopped its generation.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from quantkit.errors import QuantkitError
from quantkit.model.generate import Batch, Row, Sampling, generate
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

    def cancel(self) -> None:
        self.cancelled.set()


class Busy(Exception):
    """The queue is full."""


class _Stop(Exception):
    """Raised from on_token to end a generation early (a stop string, or a cancelled job)."""


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
    """A job in the batch: its row there, its text so far, when it started."""

    job: Job
    row: Row
    state: TextState
    t0: float


class Engine:
    """Answers jobs on a worker thread, up to max_batch decoded together; counts what happened for /health."""

    def __init__(self, model: Transformer, tokenizer: ChatTokenizer, max_queue: int = 64, max_batch: int = 8):
        if max_batch < 1:
            raise QuantkitError("max_batch must be at least 1")
        self.model, self.tokenizer, self.max_queue, self.max_batch = model, tokenizer, max_queue, max_batch
        self.end_ids = set(tokenizer.stop_ids)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = dict(completed=0, cancelled=0, failed=0, generated_tokens=0, kv_caches_freed=0, decode_steps=0,
                          batched_steps=0, max_batch_seen=0)  # fmt: skip
        self.running: str | None = None
        self._current: Job | None = None
        self._active: list[_Active] = []
        self._thread = threading.Thread(target=self._work, name="quantkit-generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self.max_queue} requests are already waiting")
        job.id = job.id or f"job-{next(self._ids)}"
        self._queue.put(job)
        return job

    def status(self) -> dict:
        with self._lock:
            return {**self.stats, "queued": self._queue.qsize(), "running": self.running,
                    "kv_cache_allocated": self.kv_cache_allocated(), "max_batch": self.max_batch}  # fmt: skip

    def kv_cache_allocated(self) -> bool:
        return any(layer.self_attn.kv_cache is not None for layer in self.model.layers)

    def close(self, timeout: float = 30) -> None:
        """Cancel the running job and the waiting ones, then stop the worker."""
        for job in [self._current, *(a.job for a in list(self._active))]:
            if job is not None:
                job.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(("error", "the server is shutting down", 503))
        self._queue.put(None)
        self._thread.join(timeout)

    def _count(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self.stats[k] += v

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.max_batch > 1:
                if not self._work_batched(job):
                    return
                continue
            if job.cancelled.is_set():
                self._count(cancelled=1)
                log.info("%s cancelled before it started", job.id)
                continue
            self.running, self._current = job.id, job
            try:
                self._run(job)
            finally:
                self.running, self._current = None, None

    def _run(self, job: Job) -> None:
        state = TextState(self.tokenizer, job.stop)
        cancelled = False

        def on_token(token: int) -> None:
            nonlocal cancelled
            if job.cancelled.is_set():
                cancelled = True
                raise _Stop
            delta = state.add(token, token in self.end_ids)
            if len(state.generated) == 1:
                job.emit(("first", token))
            if delta:
                job.emit(("text", delta))
            if state.hit_stop:
                raise _Stop

        t0 = time.perf_counter()
        s = job.sampling
        try:
            generate(self.model, job.input_ids, job.images or None, max_new_tokens=s.max_new_tokens,
                     temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop_ids=sorted(self.end_ids),
                     on_token=on_token)  # fmt: skip
        except _Stop:
            pass
        except QuantkitError as e:
            self._after(failed=1)
            job.emit(("error", str(e), 400))
            return
        except Exception as e:  # a bug or an out-of-memory: this request fails, the server keeps serving
            log.exception("%s failed", job.id)
            self._after(failed=1)
            job.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))
            return
        n = len(state.generated)
        if cancelled:
            freed = self._after(cancelled=1, generated_tokens=n)
            log.info("%s cancelled after %d tokens (client gone); KV cache %s", job.id, n,
                     "freed" if freed else "NOT freed")  # fmt: skip
            return
        delta = state.finish()
        if delta:
            job.emit(("text", delta))
        self._after(completed=1, generated_tokens=n)
        ended = state.hit_stop or (n > 0 and state.generated[-1] in self.end_ids)
        usage = Usage(len(job.input_ids), n, state.generated, state.text, "stop" if ended else "length")
        log.info("%s: %d prompt + %d tokens in %.2f s", job.id, len(job.input_ids), n, time.perf_counter() - t0)
        job.emit(("done", usage))

    def _work_batched(self, job: Job) -> bool:
        """Decode job and the jobs that come while it runs, up to max_batch at a time, until none is left.
        Returns False when the server is stopping."""
        batch = Batch(self.model, self.max_batch)
        stopping = False
        try:
            while True:
                while len(self._active) < self.max_batch and not stopping:  # join while there is room
                    if job is None:
                        try:
                            job = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if job is None:
                            stopping = True
                            break
                    self._join(batch, job)
                    job = None
                if not self._active:
                    return not stopping
                try:
                    rows = batch.step()
                except Exception as e:  # a bug or an out-of-memory: these requests fail, the server keeps serving
                    log.exception("a batched decode step failed")
                    for a in list(self._active):
                        self._leave(batch, a, failed=1)
                        a.job.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))
                    continue
                self._count(decode_steps=1, batched_steps=int(len(rows) > 1))
                with self._lock:
                    self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(rows))
                for a in list(self._active):
                    self._take(batch, a)
        except Exception as e:  # a bug outside the model: fail what is in the batch, keep the worker alive
            log.exception("the batch failed")
            batch.close()
            failed, self._active[:], self.running = list(self._active), [], None
            self._count(failed=len(failed), kv_caches_freed=len(failed))
            for a in failed:
                a.job.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))
            return not stopping
        finally:
            batch.close()
            self._active.clear()
            self.running = None

    def _join(self, batch: Batch, job: Job) -> None:
        """Prefill a job into the batch and handle its first token."""
        if job.cancelled.is_set():
            self._count(cancelled=1)
            log.info("%s cancelled before it started", job.id)
            return
        try:
            row = batch.add(job.input_ids, job.images or None, job.sampling, sorted(self.end_ids))
        except Exception as e:  # a bad prompt (400), or a bug or an out-of-memory (500): the server keeps serving
            if not self._active:
                batch.close()
            self._count(failed=1)
            if isinstance(e, QuantkitError):
                job.emit(("error", str(e), 400))
            else:
                log.exception("%s failed", job.id)
                job.emit(("error", f"generation failed: {type(e).__name__}: {e}", 500))
            return
        self._active.append(_Active(job, row, TextState(self.tokenizer, job.stop), time.perf_counter()))
        self.running = ", ".join(a.job.id for a in self._active)
        self._take(batch, self._active[-1])

    def _take(self, batch: Batch, a: _Active) -> None:
        """The row's newest token: stream its text, and let the job leave on cancel, stop string or the end."""
        job, state = a.job, a.state
        if job.cancelled.is_set():
            n = len(state.generated)
            self._leave(batch, a, cancelled=1, generated_tokens=n)
            log.info("%s cancelled after %d tokens (client gone); its KV cache row freed", job.id, n)
            return
        token = a.row.output_ids[-1]
        delta = state.add(token, token in self.end_ids)
        if len(state.generated) == 1:
            job.emit(("first", token))
        if delta:
            job.emit(("text", delta))
        if not (state.hit_stop or a.row.done):
            return
        n = len(state.generated)
        delta = state.finish()
        if delta:
            job.emit(("text", delta))
        self._leave(batch, a, completed=1, generated_tokens=n)
        ended = state.hit_stop or state.generated[-1] in self.end_ids
        usage = Usage(len(job.input_ids), n, state.generated, state.text, "stop" if ended else "length")
        log.info("%s: %d prompt + %d tokens in %.2f s", job.id, len(job.input_ids), n, time.perf_counter() - a.t0)
        job.emit(("done", usage))

    def _leave(self, batch: Batch, a: _Active, **counts: int) -> None:
        """Take a job out of the batch (its cache row zeroed and free; the whole cache when none is left), then
        count it."""
        batch.remove(a.row)
        self._active.remove(a)
        if not self._active:
            batch.close()
        self.running = ", ".join(x.job.id for x in self._active) or None
        self._count(**counts, kv_caches_freed=1)

    def _after(self, **counts: int) -> bool:
        """Count the outcome, and whether generate() left the KV cache freed."""
        freed = not self.kv_cache_allocated()
        self._count(**counts, kv_caches_freed=int(freed))
        return freed

"""Continuous batching: requests join the running batch between decode steps and leave it when done.

One :class:`ContinuousBatcher` owns the engine (its model, KV backend and tokenizer) on one thread.
Each step it retires finished and cancelled rows, admits queued requests into the free rows
(prefill, then the first token), and runs one decode step over every row in flight. Rows in
flight are always cache rows 0..B-1: a retired row's place is taken by the last row
(``AttentionBackend.move_row``), so no padding row ever decodes.

Requests arrive from other threads (the HTTP server's event loop) through :meth:`submit`, which
answers at once: queued, or :class:`QueueFull` (the server's 429), or a bad request. Each
request's ``emit`` callback receives its text as it grows, on the engine thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .attention import ForwardBatch
from .engine import Engine, RequestOutput
from .errors import OffloadError
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDetokenizer

# Generated tokens per second are reported over this many recent seconds.
RATE_WINDOW_S = 10.0
# How long an idle engine thread sleeps before it looks at the queue again (a submit wakes it).
IDLE_WAIT_S = 0.5


class QueueFull(OffloadError):
    """Every row is busy and the queue holds ``max_queue`` requests: retry later."""


@dataclass
class Request:
    """One generation request. ``emit(delta, output)`` is called on the engine thread for each new
    piece of text, and once more with ``output.finish_reason`` set ("stop", "length", "cancelled",
    or "error" with ``error`` set) when it ends. Set ``cancelled`` from any thread to free its row
    at the next step."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[str, RequestOutput], None]
    prompt: str | None = None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


@dataclass
class _Row:
    """A request in flight: its output so far and what the next decode step feeds."""

    request: Request
    output: RequestOutput
    detok: IncrementalDetokenizer
    sampler: Sampler
    budget: int  # tokens it may still generate in all
    length: int  # tokens in its cache row
    next_token: int = -1  # fed at the next decode step


@dataclass
class BatcherStats:
    """Counters for /metrics (monotonic, except the gauges read from the batcher itself)."""

    requests_admitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    index_build_seconds: float = 0.0
    decode_seconds: float = 0.0
    recent: deque = field(default_factory=deque, repr=False)  # times of the tokens of the last RATE_WINDOW_S

    def count_token(self, now: float) -> None:
        """On the engine thread: one more token; tokens older than the window are dropped here."""
        self.recent.append(now)
        while now - self.recent[0] > RATE_WINDOW_S:
            self.recent.popleft()

    def tokens_per_second(self, now: float) -> float:
        """From any thread (a snapshot: list() of a deque runs without releasing the GIL)."""
        return sum(1 for t in list(self.recent) if now - t <= RATE_WINDOW_S) / RATE_WINDOW_S


class ContinuousBatcher:
    """Runs ``engine`` for requests that come and go: at most ``max_rows`` in flight (the KV cache
    holds that many rows of the engine's max context, allocated once), ``max_queue`` waiting."""

    def __init__(self, engine: Engine, max_rows: int, max_queue: int):
        if max_rows <= 0 or max_queue < 0:
            raise OffloadError(f"max_rows must be positive and max_queue non-negative, got {max_rows}, {max_queue}")
        self.engine, self.max_rows, self.max_queue = engine, max_rows, max_queue
        self.device = engine.model.device
        engine.backend.allocate(max_rows, engine.max_context)
        self.rows: list[_Row] = []  # row b of the cache is rows[b]
        self.queue: deque[Request] = deque()
        self.stats = BatcherStats()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ from any thread
    def submit(self, request: Request) -> None:
        """Queue ``request`` (its prompt is checked here: a bad one raises InvalidRequestError), or
        raise QueueFull."""
        self.engine.check_prompt(request.prompt_ids)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if len(self.queue) >= self.max_queue + self.max_rows - len(self.rows):
                self.stats.requests_rejected += 1
                raise QueueFull(f"{len(self.rows)} requests in flight and {len(self.queue)} queued: retry later")
            self.queue.append(request)
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="offload-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (a server answers /health with it)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def in_flight(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.queue and not self.rows:
                    self._wake.wait(IDLE_WAIT_S)
                if self._stopping:
                    break
            self.step()
        for row in self.rows:  # a stopping server tells whoever still waits
            if not row.output.finished:
                self._finish(row, "cancelled")
        self.rows.clear()
        with self._wake:
            waiting, self.queue = list(self.queue), deque()
        for request in waiting:
            request.emit("", RequestOutput(request.prompt, request.prompt_ids, finish_reason="cancelled"))

    @torch.inference_mode()
    def step(self) -> None:
        """Retire, admit, decode once. Any error fails the rows it concerns, never the batcher."""
        try:
            self._retire()
            self._admit()
            self._retire()  # a request may end at its first token (EOS, a stop string, max_tokens=1)
            if self.rows:
                self._decode()
        except Exception as e:  # noqa: BLE001 - a server outlives a failed step: its rows end with the error
            message = f"{type(e).__name__}: {e}"
            for b, row in enumerate(self.rows):
                self.engine.backend.release_row(b)
                if not row.output.finished:
                    row.request.error = message
                    self._finish(row, "error")
            self.rows.clear()

    def _retire(self) -> None:
        for row in self.rows:
            if row.request.cancelled and not row.output.finished:
                self._finish(row, "cancelled")
        b = 0
        while b < len(self.rows):
            while self.rows and self.rows[-1].output.finished:
                self.rows.pop()
                self.engine.backend.release_row(len(self.rows))
            if b >= len(self.rows) or not self.rows[b].output.finished:
                b += 1
                continue
            last = self.rows[-1]  # unfinished: it takes the freed place, so rows stay 0..B-1
            cached = (last.output.prompt_token_ids + last.output.token_ids)[:last.length]
            self.engine.backend.move_row(len(self.rows) - 1, b, cached)  # (releases both rows' old state)
            self.rows[b] = last
            self.rows.pop()  # after the move: were it to fail, `last` is still here to be told
            b += 1

    def _admit(self) -> None:
        while len(self.rows) < self.max_rows:
            with self._wake:
                if not self.queue:
                    return
                request = self.queue.popleft()
            if request.cancelled:
                request.emit("", RequestOutput(request.prompt, request.prompt_ids, finish_reason="cancelled"))
                self.stats.requests_cancelled += 1
                continue
            try:
                self._prefill(request)
            except Exception as e:  # noqa: BLE001 - this request fails alone (e.g. memory for its prompt)
                request.error = f"{type(e).__name__}: {e}"
                if self.rows and self.rows[-1].request is request:
                    row = self.rows.pop()
                    self.engine.backend.release_row(len(self.rows))
                    self._finish(row, "error")
                else:
                    self.stats.requests_failed += 1
                    request.emit("", RequestOutput(request.prompt, request.prompt_ids, finish_reason="error"))

    def _prefill(self, request: Request) -> None:
        ids, p, engine = request.prompt_ids, request.params, self.engine
        row = _Row(request, RequestOutput(prompt=request.prompt, prompt_token_ids=list(ids)),
                   IncrementalDetokenizer(engine.tokenizer, ids), Sampler([p], self.device),
                   budget=min(p.max_new_tokens, engine.max_context - len(ids)), length=len(ids))
        b = len(self.rows)
        engine.backend.release_row(b)  # nothing of an earlier sequence in this row may survive
        self.rows.append(row)
        self.stats.requests_admitted += 1
        self.stats.prompt_tokens += len(ids)
        t0 = time.perf_counter()
        logits = engine.prefill(b, ids)  # [V]
        t1 = time.perf_counter()
        engine.backend.build_indexes(b, len(ids))  # timed apart: the sparse policies' cost of a prompt
        self.stats.prefill_seconds += t1 - t0
        self.stats.index_build_seconds += time.perf_counter() - t1
        self._take(row, logits[None])

    def _decode(self) -> None:
        t0 = time.perf_counter()
        tokens = [row.next_token for row in self.rows]
        batch = ForwardBatch.decode([row.length for row in self.rows], self.device, tokens)
        logits = self.engine.model(torch.tensor(tokens, device=self.device)[:, None], batch,
                                   self.engine.backend)[:, -1]  # [B, V]
        for b, row in enumerate(self.rows):
            row.length += 1
            self._take(row, logits[b:b + 1])
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0

    def _take(self, row: _Row, logits: torch.Tensor) -> None:
        """Pick the row's next token from logits [1, V] and pass on its text."""
        (token,), (finite,) = row.sampler.pick(logits)
        row.next_token = token
        if not finite:
            row.request.error = "the model produced NaN/inf logits: the weights are likely corrupt or the dtype overflows"
            self._finish(row, "error")
            return
        now = time.perf_counter()
        if row.request.first_token_at is None:
            row.request.first_token_at = now
        before = len(row.output.token_ids)
        delta = self.engine.append_token(row.output, token, row.detok, row.request.params, row.budget)
        if len(row.output.token_ids) > before:  # EOS is not a generated token
            self.stats.generated_tokens += 1
            self.stats.count_token(now)
        if row.output.finished:
            self._finish(row, row.output.finish_reason, delta)
        elif delta:
            row.request.emit(delta, row.output)

    def _finish(self, row: _Row, reason: str, delta: str = "") -> None:
        row.output.finish_reason = reason
        if reason == "cancelled":
            self.stats.requests_cancelled += 1
        elif reason == "error":
            self.stats.requests_failed += 1
        else:
            self.stats.requests_finished += 1
        row.request.emit(delta, row.output)

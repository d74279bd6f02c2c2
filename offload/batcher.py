"""Continuous batching: requests join the running batch between decode steps and leave it when done.

One :class:`ContinuousBatcher` owns the engine (its model, KV backend and tokenizer) on one thread.
Each step it retires finished and cancelled rows, admits queued requests into the free rows, and
makes one model call: a decode step over every row in flight with the prompts just admitted laid
beside it (a :class:`~offload.attention.MixedBatch`: each weight is read once for both; a prompt
longer than ``prefill_chunk_size`` is prefilled alone, in chunks, before it joins). Rows in
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

from .attention import ForwardBatch, MixedBatch
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
    rows_decoded: int = 0  # summed over decode steps: rows_decoded / decode_steps is the mean batch width
    prompts_beside_decode: int = 0  # prompts prefilled in the same model call as a decode step
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
        """Retire, admit, then one model call: a decode step of the rows in flight with the prompts
        of the rows just admitted beside it. Any error fails the rows it concerns, never the batcher."""
        joining: list[_Row] = []
        try:
            self._retire()
            joining = self._admit()
            self._retire()  # a long prompt prefilled alone may end at its first token (EOS, a stop string, max_tokens=1)
            if self.rows or joining:
                self._forward(joining)
        except Exception as e:  # noqa: BLE001 - a server outlives a failed step: its rows end with the error
            message = f"{type(e).__name__}: {e}"
            for b in range(len(self.rows)):
                self.engine.backend.release_row(b)
            for row in self.rows + [row for row in joining if row not in self.rows]:
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

    def _admit(self) -> list[_Row]:
        """Take queued requests into free rows. Prompts of up to ``prefill_chunk_size`` tokens (in all,
        this step) join the next model call (returned, not yet in ``rows``); a longer prompt is
        prefilled alone here, in chunks, and joins the rows at once."""
        joining: list[_Row] = []
        budget = self.engine.prefill_chunk_size  # prompt tokens the next call may carry
        while len(self.rows) + len(joining) < self.max_rows:
            with self._wake:
                if not self.queue:
                    break
                request = self.queue[0]
                n = len(request.prompt_ids)
                if n <= self.engine.prefill_chunk_size and n > budget:
                    break  # the next step takes it
                self.queue.popleft()
            if request.cancelled:
                request.emit("", RequestOutput(request.prompt, request.prompt_ids, finish_reason="cancelled"))
                self.stats.requests_cancelled += 1
                continue
            self.stats.requests_admitted += 1
            self.stats.prompt_tokens += n
            row = self._new_row(request)
            if n <= self.engine.prefill_chunk_size:
                joining.append(row)
                budget -= n
                continue
            try:
                self._prefill_alone(row)
            except Exception as e:  # noqa: BLE001 - this request fails alone (e.g. memory for its prompt)
                request.error = f"{type(e).__name__}: {e}"
                if self.rows and self.rows[-1] is row:
                    self.rows.pop()
                    self.engine.backend.release_row(len(self.rows))
                self._finish(row, "error")
        return joining

    def _new_row(self, request: Request) -> _Row:
        ids, p, engine = request.prompt_ids, request.params, self.engine
        return _Row(request, RequestOutput(prompt=request.prompt, prompt_token_ids=list(ids)),
                    IncrementalDetokenizer(engine.tokenizer, ids), Sampler([p], self.device),
                    budget=min(p.max_new_tokens, engine.max_context - len(ids)), length=len(ids))

    def _prefill_alone(self, row: _Row) -> None:
        """A long prompt: prefilled in chunks by the engine before it joins the decode steps."""
        ids, engine = row.request.prompt_ids, self.engine
        b = len(self.rows)
        engine.backend.release_row(b)  # nothing of an earlier sequence in this row may survive
        self.rows.append(row)
        t0 = time.perf_counter()
        logits = engine.prefill(b, ids)  # [V]
        t1 = time.perf_counter()
        engine.backend.build_indexes(b, len(ids))  # timed apart: the sparse policies' cost of a prompt
        self.stats.prefill_seconds += t1 - t0
        self.stats.index_build_seconds += time.perf_counter() - t1
        self._take(row, logits[None])

    def _forward(self, joining: list[_Row]) -> None:
        """One model call: a decode step of rows 0..B-1 and, beside it, the whole prompts of the rows
        joining (rows B..). Every weight is read once for all of them, so a prompt admitted while
        others decode costs little more than their step (a separate prefill would read them twice)."""
        t0 = time.perf_counter()
        B, engine = len(self.rows), self.engine
        tokens = [row.next_token for row in self.rows]
        decode = ForwardBatch.decode([row.length for row in self.rows], self.device, tokens) if B else None
        prefills = []
        for row in joining:
            b, ids = len(self.rows), row.request.prompt_ids
            engine.backend.release_row(b)  # nothing of an earlier sequence in this row may survive
            self.rows.append(row)
            prefills.append(ForwardBatch.prefill(b, 0, len(ids), self.device, ids))
            tokens += ids
        if prefills:
            batch = MixedBatch.of(decode, prefills)
            logits = engine.model(torch.tensor([tokens], device=self.device), batch, engine.backend)[0]  # [M, V]
        else:
            logits = engine.model(torch.tensor(tokens, device=self.device)[:, None], decode,
                                  engine.backend)[:, -1]  # [B, V]
        t1 = time.perf_counter()
        for b in range(B, len(self.rows)):
            engine.backend.build_indexes(b, self.rows[b].length)
        t2 = time.perf_counter()
        for b, row in enumerate(self.rows):
            if b < B:
                row.length += 1
            self._take(row, logits[b:b + 1])
        # the call's time, shared between decode and prefill by the tokens each brought
        prompt_tokens = len(tokens) - B
        self.stats.index_build_seconds += t2 - t1
        self.stats.prefill_seconds += (t1 - t0) * prompt_tokens / len(tokens)
        self.stats.decode_seconds += (t1 - t0) * B / len(tokens) + time.perf_counter() - t2
        self.stats.decode_steps += int(B > 0)
        self.stats.rows_decoded += B
        self.stats.prompts_beside_decode += len(joining) if B else 0

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

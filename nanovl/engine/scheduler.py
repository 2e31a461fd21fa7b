"""Continuous batching: requests join and leave the running batch between decode steps.

- Each admitted request owns a slot of a SlotCache (its own length and, for Nemotron-H, its own
  Mamba state). A new request is prefilled alone into its slot, then decodes together with every
  other active request: one batched forward per step, each row at its own position, masked to its
  own keys.
- Admission is bounded: at most `max_slots` running, at most `max_queue` waiting (`QueueFull` beyond),
  and at most `prefill_budget` prompt tokens prefilled between two decode steps (at least one
  request), so long prompts do not stall the running ones for long.
- Each request samples and stops through its own `TokenStep` (engine/step.py, shared with the
  single-stream generator): its own parameters, seeded generator and stop strings; it ends on
  end-of-sequence, a stop string, its token limit, the slot's capacity, its deadline, or `cancel`
  (a disconnected client); its slot is freed at once.
- Results go out through a callback, one `Delta` per token, so a server can forward them to an
  event loop; `run` serves from a background thread, `close` finishes what is running.
- Errors stay with the request that caused them: whatever fails while prefilling, sampling or
  constraining one request ends that request with finish_reason "error" (and the message), and the
  others go on. A failed batched step ends the rows it held. The loop itself never dies of an
  exception; `health` says whether it is alive and stepping, and `revive` restarts a dead one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanovl.engine.constrained import constraint_for
from nanovl.engine.sampling import SamplingParams
from nanovl.engine.step import Delta, TokenStep
from nanovl.errors import RequestError

log = logging.getLogger("nanovl.engine")


class QueueFull(RequestError):
    """The waiting queue is full: try again later (HTTP 429)."""


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_delta: Callable[[Delta], None]
    embeds: torch.Tensor | None = None  # (len(prompt), hidden): prefill from these instead of the ids
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    timeout: float | None = None  # seconds from submission
    constraint: object | None = None  # a JSON constraint compiled at admission (else built from params)
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # with finish_reason "error"
    first_token_at: float | None = None


@dataclass
class Row:
    """A running request's decode state."""

    req: Request
    slot: int
    step: TokenStep  # penalties, constraint, sampling, finish rules and text
    logits: torch.Tensor | None = None  # (V,) float32 for the next token


class Scheduler:
    def __init__(self, model, tokenizer, max_slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                 prefill_budget: int = 4096, cache_bytes: int = 4 << 30):  # fmt: skip
        """max_len: tokens per slot (prompt + output); by default as many as `cache_bytes` of KV cache
        allow for `max_slots` slots, at most the model's context."""
        self.model, self.tokenizer = model, tokenizer
        context = model.config.max_position_embeddings
        if max_len is None:
            max_len = max(cache_bytes // (max_slots * kv_bytes_per_token(model)), 1)
        self.max_len = min(max_len, context)
        self.cache = model.make_slot_cache(max_slots, self.max_len)
        self.cache_slots = max_slots
        self.free = list(range(max_slots))
        self.rows: dict[int, Row] = {}
        self.waiting: deque[Request] = deque()
        self.max_queue, self.prefill_budget = max_queue, prefill_budget
        self.eos = set(tokenizer.eos_token_ids)
        self.cond = threading.Condition()
        self.closing = False
        self.thread: threading.Thread | None = None
        self.step_started: float | None = None  # monotonic time of the step in progress (None: idle)
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "cancelled": 0, "finished": 0,
                      "errors": 0, "restarts": 0}  # fmt: skip

    # --- the outside world ------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not req.prompt:
            raise RequestError("the prompt is empty")
        if len(req.prompt) >= self.max_len:
            raise RequestError(
                f"prompt is {len(req.prompt)} tokens, but the server's context is {self.max_len} tokens "
                "(the prompt plus at least one new token must fit)"
            )
        with self.cond:
            if self.closing:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again later")
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.cond.notify()
        return req

    def cancel(self, req: Request):
        req.cancelled = True  # seen between two steps; the slot is freed then
        with self.cond:
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    def run(self):
        """Serve from a background thread until `close`."""
        self.thread = threading.Thread(target=self._loop, name="nanovl-scheduler", daemon=True)
        self.thread.start()

    def health(self, stall_after: float = 300.0) -> str | None:
        """None when the loop is alive and its current step (if any) began less than `stall_after`
        seconds ago; otherwise what is wrong."""
        if self.thread is None or not self.thread.is_alive():
            return "the engine loop is not running"
        started = self.step_started
        if started is not None and time.monotonic() - started > stall_after:
            return f"the engine has been in one step for {time.monotonic() - started:.0f} s"
        return None

    def revive(self) -> bool:
        """Restart a loop that died (the watchdog calls this); the requests it held end with an error.
        Returns whether it restarted."""
        if self.closing or self.thread is None or self.thread.is_alive():
            return False
        self._fail_all("the engine loop stopped and was restarted")
        self.step_started = None
        self.stats["restarts"] += 1
        log.error("nanovl: the engine loop had stopped; restarted it")
        self.run()
        return True

    def close(self, timeout: float | None = None):
        """Stop admitting, finish what is running and waiting, stop the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self):
        while True:
            with self.cond:
                while not self.waiting and not self.rows and not self.closing:
                    self.cond.wait()
                if self.closing and not self.waiting and not self.rows:
                    return
            self.step_started = time.monotonic()
            try:
                self.step()
            except Exception as e:  # a bug outside any one request: end what it held, keep serving
                log.exception("nanovl: engine step failed")
                self._fail_all(f"engine step failed: {e}")
            finally:
                self.step_started = None

    def _fail(self, req: Request, e: Exception | str):
        """End one request with an error; its slot (if it has one) is freed by `_retire`."""
        if req.finish_reason is not None:
            return
        if isinstance(e, Exception) and not isinstance(e, RequestError):
            log.error("nanovl: request %d failed", req.id, exc_info=e)
        req.finish_reason, req.error = "error", str(e) or type(e).__name__
        self.stats["errors"] += 1
        try:
            req.on_delta(Delta(0, "", None, "error", error=req.error))
        except Exception:
            log.exception("nanovl: a request's callback failed")

    def _fail_all(self, message: str):
        """End every running and waiting request with an error; every slot is free again."""
        for row in list(self.rows.values()):
            self._fail(row.req, message)
        self.rows.clear()
        self.free = list(range(self.cache_slots))
        with self.cond:
            pending, self.waiting = list(self.waiting), deque()
        for req in pending:
            self._fail(req, message)

    # --- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self):
        """Admit and prefill what the budget allows, then one decode step for every running row."""
        budget = self.prefill_budget
        admitted = []
        while self.free:
            with self.cond:
                if not self.waiting or (budget < len(self.waiting[0].prompt) and budget < self.prefill_budget):
                    break
                req = self.waiting.popleft()
            budget -= len(req.prompt)
            if req.cancelled:
                self._finish_unstarted(req)
                continue
            admitted.append((req, self.free.pop()))
        # Mamba layers need each prompt alone (padding would decay their state); attention-only
        # models prefill the text-only newcomers together, right-padded.
        together = [(r, s) for r, s in admitted if r.embeds is None] if not self.model.recurrent else []
        if len(together) < 2:
            together = []
        batched = set()
        if together:
            try:
                self._prefill_batch(together)
                batched = {id(r) for r, _ in together}
            except Exception:  # prefill them one by one, so only the one at fault fails
                log.exception("nanovl: batched prefill failed; prefilling alone")
                for _, slot in together:
                    self.rows.pop(slot, None)
        for req, slot in admitted:
            if id(req) not in batched:
                try:
                    self._prefill(req, slot)
                except Exception as e:
                    self.rows.pop(slot, None)
                    self.free.append(slot)
                    self._fail(req, e)
        for row in list(self.rows.values()):  # the first token of new rows, and expired / cancelled rows
            if row.logits is not None and not row.req.output:
                self._emit_safely(row)
        live = [r for r in self.rows.values() if r.req.finish_reason is None]
        self._retire()
        if not live:
            return
        self.cache.use([r.slot for r in live])
        tokens = torch.tensor([[r.req.output[-1]] for r in live], device=self.model.device)
        try:
            logits = self.model(tokens, self.cache.positions(1), self.cache, self.cache.attention_mask(1))
        except Exception as e:  # the batch step itself failed: no row can go on from a torn cache
            for r in live:
                self._fail(r.req, f"decode step failed: {e}")
            self._retire()
            return
        for r, lg in zip(live, logits[:, -1].float()):
            r.logits = lg
            self._emit_safely(r)
        self._retire()

    def _emit_safely(self, row: Row):
        try:
            self._emit(row)
        except Exception as e:
            self._fail(row.req, e)

    def _prefill(self, req: Request, slot: int):
        self.cache.reset(slot)
        self.cache.use([slot])
        device = self.model.device
        ids = torch.tensor([req.prompt], device=device)
        embeds = None if req.embeds is None else req.embeds[None].to(device, self.model.dtype)
        positions, mask = self.cache.positions(len(req.prompt)), self.cache.attention_mask(len(req.prompt))
        logits = self.model(ids, positions, self.cache, mask, embeds=embeds, last_only=True)[0, -1].float()
        self._start(req, slot, logits)

    def _prefill_batch(self, batch: list[tuple[Request, int]]):
        """Several prompts in one forward, right-padded: a real token never sees the padding after it
        (causal mask), each slot then keeps only its real length, and later writes overwrite the
        padding's keys and values."""
        for _, slot in batch:
            self.cache.reset(slot)
        self.cache.use([slot for _, slot in batch])
        lengths = torch.tensor([len(r.prompt) for r, _ in batch], device=self.model.device)
        T = int(lengths.max())
        ids = torch.zeros(len(batch), T, dtype=torch.long, device=self.model.device)
        for i, (r, _) in enumerate(batch):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
        positions, mask = self.cache.positions(T), self.cache.attention_mask(T)
        self.cache.advance_by = lengths
        try:
            logits = self.model(ids, positions, self.cache, mask, last_index=lengths - 1)[:, -1].float()
        finally:
            self.cache.advance_by = None
        for (req, slot), lg in zip(batch, logits):
            self._start(req, slot, lg)

    def _start(self, req: Request, slot: int, logits: torch.Tensor):
        """A prefilled request becomes a running row, its first token sampled from `logits`."""
        constraint = req.constraint
        if constraint is None:
            constraint = constraint_for(self.tokenizer, self.model.config.vocab_size, req.params, req.prompt)
        step = TokenStep(req.prompt, req.params, self.eos, self.max_len - len(req.prompt), self.tokenizer,
                         constraint, req.top_logprobs, self.model.device)  # fmt: skip
        req.output = step.output
        self.rows[slot] = Row(req, slot, step, logits)
        self.stats["prompt_tokens"] += len(req.prompt)

    def _emit(self, row: Row):
        """Sample the row's next token from row.logits and hand out its delta."""
        req = row.req
        if req.cancelled or (req.timeout is not None and time.monotonic() - req.submitted > req.timeout):
            req.finish_reason = "cancelled" if req.cancelled else "timeout"
            self.stats["cancelled"] += req.cancelled
            req.on_delta(Delta(0, "", None, req.finish_reason))
            return
        delta = row.step(row.logits)
        req.finish_reason = delta.finish_reason
        req.first_token_at = req.first_token_at or time.monotonic()
        self.stats["generated_tokens"] += 1
        req.on_delta(delta)

    def _retire(self):
        for slot, row in list(self.rows.items()):
            if row.req.finish_reason is not None:
                del self.rows[slot]
                self.free.append(slot)
                self.stats["finished"] += 1

    def _finish_unstarted(self, req: Request):
        req.finish_reason = "cancelled"
        self.stats["cancelled"] += 1
        req.on_delta(Delta(0, "", None, "cancelled"))


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token takes in the cache, over every attention layer."""
    cfg = model.config
    layers = cfg.pattern.count("*")
    return max(layers * 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize, 1)


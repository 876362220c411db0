"""The continuous-batching engine: generation scheduled one token at a time over a fixed KV pool.

    engine = Engine(model, max_batch=32, kv_memory_bytes=2 << 30, decode_text=tokenizer_decode)
    engine.start()                                   # a background thread runs the loop
    handle = engine.submit(Request(ids, vision, SamplingParams(max_tokens=64)), on_event=callback)
    ...
    engine.stop()                                    # finishes what is in flight, then returns

One iteration of the loop (`step`):
1. cancelled requests leave (their row is free for the next iteration);
2. prefill work up to `chunk_tokens` tokens' worth (a request's image tiles one at a time, then
   its prompt in chunks; several short prompts in one iteration): a prefilled request samples
   its first token and joins the running batch as soon as a row is free (kv_pool.KVPool);
3. one decode step for every running row (the model's own decode_step on a view of the pool),
   one token sampled per row, and rows that finished (a stop token, a stop string, max_tokens)
   leave at once.
So a long prompt never stalls the running batch for more than about one chunk, and a short
answer never waits for a long one.

Answers equal SmolVLM.generate run alone on the same prompt (float32), token for token: the
prompt is prefilled as generate() prefills it, each row keeps its own rotary positions and a
key mask hiding every slot that is not its own, and each sampled request draws from its own
generator seeded by its seed. (Only float rounding differs: other batch sizes in the GEMMs.)

Decoding modes: "eager" (model.decode_step; on a CPU up to fast_decode.MAX_ROWS rows run the native step), "static"
(model.decode_step_static: fixed shapes, attention over the whole pool under the key mask),
"graph" (the static step captured once per batch size in a CUDA graph and replayed), "auto":
graph on CUDA when the model has the static step, else eager.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from collections.abc import Callable

import torch

from vlmfast.generation.sampling import next_tokens
from vlmfast.serving.encoder_cache import EncoderCache
from vlmfast.serving.kv_pool import KVPool
from vlmfast.serving.metrics import Metrics
from vlmfast.serving.prefill import PrefillJob, runner_for
from vlmfast.serving.prefix_cache import PrefixCache
from vlmfast.serving.request import Event, QueueFull, Request, ShuttingDown
from vlmfast.serving.text import AnswerText

DEFAULT_KV_MEMORY = 2 << 30
DEFAULT_ENCODER_CACHE = 512 << 20
DEFAULT_PREFIX_CACHE = 512 << 20
DECODE_MODES = ("auto", "eager", "static", "graph")


class Handle:
    """A request inside the engine. `result()` (after it finished): the whole answer."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None, decode_text):
        self.request = request
        self.on_event = on_event
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.cached_tokens = 0  # prompt tokens copied from the prefix cache
        self.text = AnswerText(decode_text, request.params.stop)
        self.generator = None
        self.position = None  # rotary position of the last token fed or sampled
        self.cancelled = False
        self.finished = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = threading.Event()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        return self.text.tokens

    def result(self) -> dict:
        return {"request_id": self.request_id, "token_ids": list(self.tokens), "text": self.text.text,
                "finish_reason": self.finish_reason, "prompt_tokens": self.request.prompt_len,
                "cached_tokens": self.cached_tokens, "completion_tokens": len(self.tokens), "error": self.error}


def _stop_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model, "generation_defaults", {}).get("eos_token_id")
    if eos_token_id is None:
        text = getattr(model.config, "text_config", model.config)
        eos_token_id = getattr(text, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _context_limit(model) -> int | None:
    text = getattr(model.config, "text_config", model.config)
    return getattr(text, "max_position_embeddings", None)


class Engine:
    """model: a SmolVLM (or any model with new_cache / prefill / decode_step).

    max_batch: rows decoding together. max_len: slots per row (the longest prompt + answer);
    None: from kv_memory_bytes (the KV pool's size: max_batch + 1 rows), capped by the model's
    context. chunk_tokens: prefill work per iteration. max_queue: waiting requests at most
    (beyond: QueueFull). encoder_cache_bytes: image features kept. prefix_cache_bytes: keys /
    values of prefilled prompts kept for prompts that start the same way (0: off; see
    prefix_cache.py). decode_text: token ids ->
    text (for stop strings and text deltas; None: tokens only). eos_token_id: stop tokens
    (None: the model's generate() default). decode: see DECODE_MODES.
    """

    def __init__(self, model, *, max_batch: int = 32, max_len: int | None = None,
                 kv_memory_bytes: int | None = None, chunk_tokens: int = 256, max_queue: int = 1024,
                 encoder_cache_bytes: int = DEFAULT_ENCODER_CACHE,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE, decode_text=None, eos_token_id=None,
                 decode: str = "auto"):
        for name, value in (("max_batch", max_batch), ("chunk_tokens", chunk_tokens), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode: expected one of {DECODE_MODES}, got {decode!r}")
        self.model = model
        self.device = model.device
        if max_len is None:
            budget = DEFAULT_KV_MEMORY if kv_memory_bytes is None else int(kv_memory_bytes)
            max_len = budget // ((max_batch + 1) * KVPool.bytes_per_slot(model))
            limit = _context_limit(model)
            max_len = min(max_len, limit) if limit else max_len
            if max_len < 16:
                raise ValueError(
                    f"kv_memory_bytes: {budget} bytes give {max_len} slots per row for {max_batch} rows; expected "
                    f">= 16: give more memory or fewer rows")
        self.pool = KVPool(model, max_batch, int(max_len))
        self.max_len = self.pool.max_len
        self.chunk_tokens = chunk_tokens
        self.max_queue = max_queue
        self.decode_text = decode_text
        self.stop_ids = _stop_ids(model, eos_token_id)
        if decode == "auto":
            graphable = self.device.type == "cuda" and hasattr(model, "decode_step_static")
            decode = "graph" if graphable else "eager"
        self.decode_mode = decode
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.prefix_cache = PrefixCache(int(prefix_cache_bytes))
        self.runner = runner_for(model, self.encoder_cache, self.prefix_cache)
        self.metrics = Metrics()

        self.waiting: collections.deque[Handle] = collections.deque()
        self.job: PrefillJob | None = None
        self.running: list[Handle] = []  # running[i] decodes in pool row i
        self._cv = threading.Condition()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop_now = False
        self._graphs: dict[int, object] = {}
        self._slot = None
        self._job_handle: Handle | None = None
        self._prepare_model()

    # ------------------------------------------------------------------ set-up

    def _prepare_model(self) -> None:
        from vlmfast.models.smolvlm.fast_decode import MAX_ROWS

        model = self.model
        if (self.device.type == "cpu" and getattr(model, "auto_pack", False) and model.dtype == torch.bfloat16
                and self.pool.rows > MAX_ROWS and not getattr(model, "_packed_once", False)):
            # bf16 batches beyond the native step's rows run oneDNN GEMMs: packed weights (as generate() does)
            model._packed_once = True
            model.pack_weights()

    # ------------------------------------------------------------------ the public side

    def check(self, request: Request) -> None:
        """ValueError when the request can never run here (prompt + max_tokens beyond a row)."""
        need = request.prompt_len + request.params.max_tokens
        if need > self.max_len:
            raise ValueError(
                f"input_ids: the prompt ({request.prompt_len} tokens) plus max_tokens "
                f"({request.params.max_tokens}) is {need} tokens, more than this engine's context of "
                f"{self.max_len} tokens")
        if request.params.stop and self.decode_text is None:
            raise ValueError("stop: stop strings need the engine's decode_text")

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queues a request; on_event is called (from the engine's thread) with each Event.
        Raises ValueError (see check), QueueFull or ShuttingDown."""
        self.check(request)
        handle = Handle(request, on_event, self.decode_text)
        handle.generator = request.params.generator(self.device)
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("the engine is shutting down and takes no new requests")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(handle)
            self._cv.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Ends a request at the next iteration (its row freed), with finish_reason "abort"."""
        handle.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def generate(self, requests: list[Request]) -> list[dict]:
        """Runs requests to the end (in this thread unless the loop runs in its own) and returns
        their results (Handle.result) in order. Submits as the queue allows."""
        pending = collections.deque(requests)
        handles = []
        while pending or any(not h.done.is_set() for h in handles):
            while pending and len(self.waiting) < self.max_queue:
                handles.append(self.submit(pending.popleft()))
            if self._thread is None:
                self.step()
            else:
                handles[-1].done.wait(0.05)
        return [h.result() for h in handles]

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def gauges(self) -> dict:
        pool = self.pool
        return {"queue": len(self.waiting), "running": len(self.running), "prefilling": int(self.job is not None),
                "kv_usage": pool.used_slots / (pool.rows * pool.max_len),
                "tokens_per_second": self.metrics.tokens_per_second(),
                "encoder_runs": self.runner.encoder_runs, "encoder_hits": self.encoder_cache.hits,
                "prefix_hits": self.prefix_cache.hits, "prefix_tokens_reused": self.prefix_cache.reused_tokens}

    # ------------------------------------------------------------------ the loop thread

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="vlmfast-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """No new requests; drain=True: finish those in flight (queued ones too), else abort
        them. Returns when the loop has ended."""
        with self._cv:
            self._accepting = False
            if not drain:
                self._stop_now = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def refuse_new(self) -> None:
        with self._cv:
            self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    def has_work(self) -> bool:
        return bool(self.waiting or self.job is not None or self.running)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.has_work() and self._accepting:
                    self._cv.wait()
                if self._stop_now:
                    self._abort_all("abort")
                    return
                if not self.has_work() and not self._accepting:
                    return
            self.step()

    # ------------------------------------------------------------------ one iteration

    def step(self) -> None:
        """One iteration: cancellations, prefill work, one decode step (see the module doc)."""
        with torch.inference_mode():
            self._drop_cancelled()
            self._prefill_phase()
            if self.running:
                self._decode_phase()

    def _drop_cancelled(self) -> None:
        with self._cv:
            for handle in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(handle)
                self._finish(handle, "abort")
        if self.job is not None and self._job_handle.cancelled:
            self._finish(self._job_handle, "abort")
            self.job = None
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                self._finish(self.running[i], "abort")
                self._remove_row(i)

    def _prefill_phase(self) -> None:
        budget = self.chunk_tokens
        while True:
            if self.job is None:
                with self._cv:
                    if not self.waiting or self.pool.n >= self.pool.rows:
                        return
                    handle = self.waiting.popleft()
                try:
                    self.job = PrefillJob(self.runner, handle.request, self.pool.reset_staging())
                except Exception as err:  # noqa: BLE001 - a bad request fails alone
                    self._fail(handle, err)
                    continue
                self._job_handle = handle
            job, handle = self.job, self._job_handle
            if not job.done:
                if budget <= 0 and self.running:
                    return
                try:
                    budget -= job.step(budget if self.running else 1 << 30)
                except Exception as err:  # noqa: BLE001 - a bad request fails alone
                    self.job = None
                    self._fail(handle, err)
                    continue
                if not job.done:
                    continue
                handle.position = job.position
                handle.cached_tokens = job.reused
                if self._emit_token(handle, job.logits):
                    self.job = None
                    continue
            remaining = handle.request.params.max_tokens - len(handle.tokens)
            if not self.pool.fits(handle.request.prompt_len, remaining):
                return  # prefilled; joins once older rows have finished
            self.pool.join(handle.request.prompt_len, remaining)
            self.running.append(handle)
            self.job = None

    def _decode_phase(self) -> None:
        pool = self.pool
        pool.make_room()
        n = pool.n
        view = pool.view(n)
        tokens = torch.tensor([h.tokens[-1] for h in self.running], dtype=torch.long, device=self.device)
        positions = self._next_positions()
        try:
            logits = self._decode_call(tokens, positions, view)
        except Exception as err:  # noqa: BLE001 - the batch is lost, the engine goes on
            traceback.print_exc()
            self._abort_all("error", f"decode step failed: {type(err).__name__}: {err}")
            return
        pool.sync_from(view)
        finished = []
        for i, handle in enumerate(self.running):
            if self._emit_token(handle, logits[i:i + 1], batch_logits=logits, row=i):
                finished.append(i)
        self.metrics.tokens(len(self.running))
        for i in reversed(finished):
            self._remove_row(i)

    def _next_positions(self) -> torch.Tensor:
        for handle in self.running:
            handle.position = handle.position + 1
        return torch.cat([h.position for h in self.running], dim=-1)

    def _decode_call(self, tokens, positions, view) -> torch.Tensor:
        mode = self.decode_mode
        if mode == "eager":
            return self.model.decode_step(tokens, positions, view, self.pool.padded())
        if mode == "graph":
            from vlmfast.generation.cuda_graphs import GraphedDecodeStep

            step = self._graphs.get(view.batch_size)
            if step is None or step.cache is not view:
                step = self._graphs[view.batch_size] = GraphedDecodeStep(self.model, view)
            return step(tokens, positions, view).clone()
        if self._slot is None:
            self._slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._slot.fill_(view.length)
        logits = self.model.decode_step_static(tokens, positions, self._slot, view)
        view.advance(1)
        return logits

    # ------------------------------------------------------------------ tokens and endings

    def _emit_token(self, handle: Handle, logits: torch.Tensor, *, batch_logits=None, row=None) -> bool:
        """Samples handle's next token from logits (1, V), records and emits it. Returns whether
        the request finished."""
        params = handle.request.params
        if params.greedy:
            token = int(logits.argmax(dim=-1)[0])
        else:
            token = int(next_tokens(logits, do_sample=True, temperature=float(params.temperature),
                                    top_p=float(params.top_p), top_k=params.top_k, generator=handle.generator)[0])
        now = time.monotonic()
        if handle.first_token_at is None:
            handle.first_token_at = now
            self.metrics.first_token(now - handle.arrival, handle.request.prompt_len)
            if batch_logits is None:
                self.metrics.tokens(1)
        handle.text.add(token)
        reason = None
        if token in self.stop_ids and not params.ignore_eos:
            reason = "stop"
        elif handle.text.stopped:
            reason = "stop"
        elif len(handle.tokens) >= params.max_tokens:
            reason = "length"
        self._send(handle, Event(handle.request_id, text=handle.text.delta(final=reason is not None),
                                 token_ids=[token]))
        if reason is not None:
            self._finish(handle, reason)
            return True
        return False

    def _send(self, handle: Handle, event: Event) -> None:
        if handle.on_event is None:
            return
        try:
            handle.on_event(event)
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the engine
            traceback.print_exc()

    def _finish(self, handle: Handle, reason: str, error: str | None = None) -> None:
        if handle.finished:
            return
        handle.finished, handle.finish_reason, handle.error = True, reason, error
        self.metrics.finished(reason)
        self._send(handle, Event(handle.request_id, text="", finished=True, finish_reason=reason,
                                 prompt_tokens=handle.request.prompt_len, completion_tokens=len(handle.tokens),
                                 cached_tokens=handle.cached_tokens, error=error))
        handle.done.set()

    def _fail(self, handle: Handle, err: Exception) -> None:
        self._finish(handle, "error", f"{type(err).__name__}: {err}")

    def _remove_row(self, i: int) -> None:
        self.pool.remove(i)
        last = self.running.pop()
        if i < len(self.running):
            self.running[i] = last

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        with self._cv:
            waiting = list(self.waiting)
            self.waiting.clear()
        for handle in waiting + ([self._job_handle] if self.job is not None else []) + self.running:
            self._finish(handle, reason, error)
        self.job = None
        while self.running:
            self._remove_row(len(self.running) - 1)

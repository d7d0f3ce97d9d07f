"""`Engine`: one owner of a model, many concurrent streaming requests.

    engine = Engine(model, max_batch=8, max_queue=32)     # starts its thread
    engine.voices.add("me", "me.wav")
    handle = engine.submit(SpeechRequest("Hello there.", voice="me", seed=7))   # any thread
    audio, usage = handle.result()                       # or iterate its events, sync or async
    engine.close()

One thread (the engine's loop) alone touches the model: it admits submitted requests into the
runner's T3 decoder of `max_batch` slots (its KV cache reserved at start for the longest request
it admits), steps every decoding request together, and turns each request's new speech tokens
into audio chunks as its stream schedule fills (`S3GenStreamer`: a small first chunk, then
`chunk_size` tokens, doubling up to `max_chunk_size`). The chunks of all streams whose schedule
fills in the same step go through S3Gen's flow together (`push_many`: one call for all, or calls
of up to 1200 frames on a CPU where the packed products measure faster and run:
`batch.flow_frames`); HiFT and the watermark run per stream. Callers only submit, read events and cancel.

- Admission: at step boundaries, at most `prefill_budget` prompt positions a step while others
  decode (a burst spreads over a few steps). `submit` refuses past `max_batch + max_queue`
  requests in flight with `EngineBusy` (a server's 429), and a request whose prompt plus `max_new_tokens` cannot fit the reserved
  cache with a ValueError naming the limit, so the cache never grows while serving.
- Requests with different voices, options and seeds share each step; a seeded request draws its
  T3 sampling from its own generator and its S3Gen noise and vocoder draws from another, so its
  speech tokens are the ones it gets alone.
- Failures stay where they happen: a request whose voice, text or prefill fails gets `Failed`
  and its slot is rolled back; an exception in the shared step fails the rows of that step and
  the decoder is reset, and the engine keeps serving; an S3Gen failure fails its request only.
  `failures` counts them.
- Cancellation (`handle.cancel()`, a reader that stops, a handle dropped unread) frees the slot
  at the next step boundary.
- The model is the engine's: a `generate()` or stream on the same model while the engine
  decodes takes the T3 decoder over; the engine notices at its next step, fails the requests it
  was decoding with a clear error and takes the decoder back. One while the engine is idle costs
  nothing: the engine takes the decoder back before its next admission.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from ..s3gen_kernels import batch_products, prepare_batch
from ..s3gen_stream import S3GenStreamer, push_many
from ..stream import S3_SEED_OFFSET
from .batch import flow_frames
from .split import MAX_CHARS, JoinedHandle, split_text
from .requests import (AudioChunk, Done, EngineBusy, EngineClosed, Failed, Handle, SpeechRequest, Usage,
                       chunk_target)
from .voices import VoiceRegistry

logger = logging.getLogger(__name__)

MAX_PIECES = 200  # a long text's pieces (~50 000 characters)
PREFILL_BUDGET = 256  # prompt positions prefilled per step while others decode (about 4 one-sentence requests)


@dataclass(eq=False)
class _Stream:
    """One request in the engine: its handle (weak), T3 request, S3Gen streamer, schedule."""

    handle_ref: weakref.ref
    request: SpeechRequest
    submitted: float
    t3: object = None                 # its T3Request once admitted
    streamer: object = None
    text_tokens: int = 0
    pending: list = field(default_factory=list)  # speech ids not yet pushed to S3Gen
    speech: list = field(default_factory=list)   # every id pushed (Done reports them)
    tokens: int = 0
    chunks: int = 0
    samples: int = 0
    first_chunk: float | None = None
    s3_generator: torch.Generator | None = None
    conds: object = None              # its voice's Conditionals (from the registry)

    def put(self, event) -> None:
        """Deliver an event (nowhere when the caller dropped its handle)."""
        handle = self.handle_ref()
        if handle is not None:
            handle.put(event)


class Engine:
    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 32, max_new_tokens: int = 1000,
                 max_prompt: int = 512, split_chars: int = MAX_CHARS, prefill_budget: int | None = PREFILL_BUDGET,
                 start: bool = True):
        """max_batch: requests decoded at once (T3 slots). max_queue: requests waiting beyond
        them before submit raises EngineBusy. max_new_tokens / max_prompt: the longest request
        admitted (its KV cache is reserved for them at start). split_chars: a longer text is
        split into pieces (split.py) decoded in parallel and streamed in order. prefill_budget:
        prompt positions (beyond each voice's shared prefix) prefilled in one step while other
        requests decode, so a burst of arrivals spreads over steps instead of stalling every
        running stream (at least one request is admitted per step; None: no bound)."""
        from ..families import family_of
        from .batch import BATCH_FAMILIES, _runner

        family = family_of(model)
        if family not in BATCH_FAMILIES:
            raise ValueError(f"Engine serves {', '.join(BATCH_FAMILIES)} models, not {type(model).__name__}")
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_new_tokens", max_new_tokens),
                            ("max_prompt", max_prompt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.model, self.family = model, family
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_new_tokens, self.max_prompt = max_new_tokens, max_prompt
        if isinstance(split_chars, bool) or not isinstance(split_chars, int) or split_chars < 20:
            raise ValueError(f"split_chars must be an int >= 20 (characters), got {split_chars!r}")
        self.split_chars = split_chars
        if prefill_budget is not None and (isinstance(prefill_budget, bool) or not isinstance(prefill_budget, int)
                                           or prefill_budget < 1):
            raise ValueError(f"prefill_budget must be a positive int (positions per step) or None, got {prefill_budget!r}")
        self.prefill_budget = prefill_budget
        self.voices = VoiceRegistry(model)
        self.runner = _runner(model)
        self.failures = {"admission": 0, "step": 0, "s3gen": 0, "taken_over": 0}
        self.steps = 0
        self.flow_frames = None  # mel frames per S3Gen flow call (engine/batch.py flow_frames, set at claim)
        self.s3gen_stats = {"seconds": 0.0, "flow_calls": 0, "flow_rows": 0, "flow_retries": 0}
        self._inbox: deque = deque()       # ("submit", stream) | ("cancel", handle)
        self._waiting: deque[_Stream] = deque()
        self._running: dict[int, _Stream] = {}  # id(T3Request) -> stream
        self._in_flight = 0
        self._lock = threading.Condition()
        self._closed = False
        self._owner = None
        self._decoder = None
        self._thread = None
        self.error: BaseException | None = None  # what stopped the loop, if anything did
        if start:
            self.start()

    # ---- callers ------------------------------------------------------------------------------
    def submit(self, request: SpeechRequest) -> Handle:
        """Queue a request; returns its handle at once (events follow). Thread-safe. A text
        longer than `split_chars` is split into pieces (one seed policy: piece i draws from
        seed + i); up to max(2, max_batch) of them are in flight at once (decoded in parallel),
        each later one submitted as an earlier one is read; the handle reads them in order.
        Admission counts the pieces in flight at first (EngineBusy past the bound)."""
        if not isinstance(request, SpeechRequest):
            raise TypeError(f"submit() takes a SpeechRequest, got {type(request).__name__}")
        if request.max_new_tokens is not None and request.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens={request.max_new_tokens} is over this engine's limit "
                             f"({self.max_new_tokens}); pass at most that")
        if request.voice not in self.voices:
            raise KeyError(f"unknown voice {request.voice!r}; registered: {', '.join(self.voices.names())}")
        pieces = [request.text] if len(request.text) <= self.split_chars else split_text(
            request.text, max_chars=min(self.split_chars, MAX_CHARS))
        if len(pieces) > MAX_PIECES:
            raise ValueError(f"the text is too long: {len(pieces)} pieces of up to {min(self.split_chars, MAX_CHARS)} "
                             f"characters, over the {MAX_PIECES} one request may have; send it in parts")
        if len(pieces) == 1:
            handle = Handle(self, request)
            self._enqueue([handle], bounded=True)
            return handle
        requests = [replace(request, text=piece, seed=None if request.seed is None else request.seed + i)
                    for i, piece in enumerate(pieces)]
        ahead = min(len(requests), max(2, self.max_batch))  # pieces in flight at once: the rest follow
        handles = [Handle(self, r) for r in requests[:ahead]]
        self._enqueue(handles, bounded=True)
        return JoinedHandle(self, request, handles, requests[ahead:], self.model.sr)

    def _enqueue(self, handles: list, bounded: bool) -> None:
        """Into the inbox; `bounded`: refuse past max_batch + max_queue in flight (a long
        request's later pieces are not refused: it was admitted as a whole)."""
        capacity = self.max_batch + self.max_queue
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if bounded and self._in_flight + len(handles) > capacity:
                raise EngineBusy(f"the engine is full ({self._in_flight} requests in flight, "
                                 f"{self.max_batch} decoding and {self.max_queue} queued at most; this one "
                                 f"needs {len(handles)}); retry later")
            self._in_flight += len(handles)
            now = time.perf_counter()
            for handle in handles:
                self._inbox.append(("submit", _Stream(weakref.ref(handle), handle.request, now)))
            self._lock.notify()

    def cancel(self, handle: Handle) -> None:
        with self._lock:
            self._inbox.append(("cancel", handle))
            self._lock.notify()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (queued or decoding)."""
        return self._in_flight

    @property
    def running(self) -> int:
        return len(self._running)

    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatterbox-accel-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop: requests still in flight end with Failed(EngineClosed)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the loop (engine thread) ---------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._claim()
            while True:
                with self._lock:
                    while not self._closed and not self._inbox and not self._waiting and not self._running:
                        self._lock.wait()
                    if self._closed:
                        break
                    inbox, self._inbox = list(self._inbox), deque()
                self._handle_inbox(inbox)
                self._admit()
                if self._running:
                    self._step()
        except BaseException as exc:  # a bug in the loop itself: fail everyone, say so
            self.error = exc
            logger.exception("chatterbox_accel: the engine's loop stopped")
        finally:
            self._fail_all(EngineClosed("the engine was closed" if self.error is None else
                                        f"the engine stopped: {type(self.error).__name__}: {self.error}"))

    def _claim(self) -> None:
        """Own the runner's decoder of max_batch slots, its cache reserved for the longest request."""
        self._owner = self.runner.claim()
        with torch.inference_mode():
            self._decoder = self.runner.warm(self.runner.slots_for(self.max_batch, self.max_batch),
                                             self.max_prompt + self.max_new_tokens)
            self._decoder.cache = self.runner.slot_cache(self._decoder.slots, self.max_prompt + self.max_new_tokens)
        self._decoder.prefill_budget = self.prefill_budget
        prepare_batch(self.model)  # S3Gen's packed products for the stream windows: packed and timed now
        self.flow_frames = flow_frames(self.model)

    def _handle_inbox(self, inbox) -> None:
        for kind, item in inbox:
            if kind == "submit":
                self._waiting.append(item)
            else:
                self._drop(item)

    def _drop(self, handle: Handle) -> None:
        """A cancelled handle: out of the queue, or out of its slot (free from the next step)."""
        for stream in list(self._waiting):
            if stream.handle_ref() is handle:
                self._waiting.remove(stream)
                self._finish(stream, Failed(EngineClosed("cancelled")))
        for key, stream in list(self._running.items()):
            if stream.handle_ref() is handle:
                self._decoder.cancel(stream.t3)
                del self._running[key]
                self._finish(stream, Failed(EngineClosed("cancelled")))

    def _admit(self) -> None:
        """Waiting requests into the decoder's queue while slots are free (the decoder prefills
        them at its next step). Front-end failures fail that request only."""
        if self._waiting and not self._running and not self.runner.owns(self._owner):
            with torch.inference_mode():
                self._claim()  # a generate() on this model ran while the engine was idle: nothing lost
        free = self._decoder.slots - len(self._running)
        while free > 0 and self._waiting:
            stream = self._waiting.popleft()
            if stream.handle_ref() is None:  # dropped unread
                self._finish(stream, None)
                continue
            try:
                with torch.inference_mode():
                    self._prepare(stream)
                self._decoder.submit(stream.t3)
            except Exception as exc:
                self.failures["admission"] += 1
                self._finish(stream, Failed(exc))
                continue
            self._running[id(stream.t3)] = stream
            free -= 1

    def _prepare(self, stream: _Stream) -> None:
        """The front end: voice conditionals (from the registry), text tokens, the T3 request."""
        from .frontend import t3_request

        request, model = stream.request, self.model
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=model.t3.device).manual_seed(request.seed)
            stream.s3_generator = torch.Generator(device=model.s3gen.device).manual_seed(
                request.seed + S3_SEED_OFFSET)
        stream.t3, stream.text_tokens, conds = t3_request(
            model, self.runner, self.voices, request, generator, self.max_new_tokens, key=stream)
        if stream.t3.max_len > self._decoder.cache.max_len:
            raise ValueError(f"the text is too long for this engine: its prompt ({stream.t3.prompt_len} positions) "
                             f"plus max_new_tokens exceeds the {self._decoder.cache.max_len} it reserved; shorten "
                             f"the text or start the engine with a larger max_prompt")
        stream.conds = conds

    def _step(self) -> None:
        if not self.runner.owns(self._owner):  # a generate() on this model took the decoder
            self.failures["taken_over"] += len(self._running)
            for stream in list(self._running.values()):
                self._finish(stream, Failed(RuntimeError(
                    "another generation on this model took its T3 decoder while the engine served it; "
                    "submit to the engine instead of calling generate() on its model")))
            self._running.clear()
            self._claim()
            return
        try:
            events = self._decoder.step()
        except Exception as exc:  # the shared step: every row in it fails, the engine goes on
            self.failures["step"] += len(self._running)
            logger.warning("chatterbox_accel: engine step failed (%s: %s); failing its %d request(s)",
                           type(exc).__name__, exc, len(self._running))
            self._decoder.reset()
            for stream in list(self._running.values()):
                self._finish(stream, Failed(exc))
            self._running.clear()
            return
        self.steps += 1
        for t3, exc in self._decoder.take_failed():
            stream = self._running.pop(id(t3), None)
            if stream is not None:
                self.failures["admission"] += 1
                self._finish(stream, Failed(exc))
        ready = []
        for t3, ids, finished in events:
            stream = self._running.get(id(t3))
            if stream is None:
                continue
            if stream.handle_ref() is None:  # dropped unread
                self._finish(stream, None)
                self._decoder.cancel(t3)
            elif self._take(stream, ids, finished):
                ready.append((stream, finished))
        if ready:
            self._synthesize(ready)
        for key, stream in list(self._running.items()):  # never wait on a row the decoder lost
            if not self._decoder.holds(stream.t3):
                del self._running[key]
                self._finish(stream, Failed(RuntimeError("the T3 decoder dropped this request")))

    def _take(self, stream: _Stream, ids: list, finished: bool) -> bool:
        """New speech ids of one stream; True when its chunk schedule has filled (or it ended)."""
        from .frontend import clean_tokens

        stream.pending += clean_tokens(self.runner, ids)
        stream.tokens += len(ids)
        return finished or len(stream.pending) >= chunk_target(stream.request, stream.chunks)

    def _synthesize(self, ready: list) -> None:
        """The chunks of every stream whose schedule filled this step, through S3Gen together
        (`s3gen_stream.push_many`: their flow windows batched, up to `flow_frames` per call), then
        out as events. An S3Gen failure fails its stream only."""
        items, streams = [], []
        for stream, final in ready:
            try:
                items.append((self._streamer(stream), self._chunk_ids(stream, final), final))
                streams.append((stream, final))
            except Exception as exc:
                self._s3gen_failed(stream, final, exc)
        start = time.perf_counter()
        with torch.inference_mode(), batch_products(self.model):
            outs = push_many(items, self.flow_frames, self.s3gen_stats)
        self.s3gen_stats["seconds"] += time.perf_counter() - start
        for (stream, final), audio in zip(streams, outs):
            if isinstance(audio, Exception):
                self._s3gen_failed(stream, final, audio)
            else:
                self._emit(stream, audio, final)

    def _s3gen_failed(self, stream: _Stream, final: bool, exc: Exception) -> None:
        self.failures["s3gen"] += 1
        self._finish(stream, Failed(exc))
        if not final:
            self._decoder.cancel(stream.t3)

    def _emit(self, stream: _Stream, audio: torch.Tensor, final: bool) -> None:
        now = time.perf_counter() - stream.submitted
        if audio.numel() or final:
            stream.first_chunk = stream.first_chunk if stream.first_chunk is not None else now
            stream.samples += audio.numel()
            stream.put(AudioChunk(audio.cpu(), stream.chunks, stream.samples, self.model.sr, now, final))
            stream.chunks += 1
        if final:
            audio_s = stream.samples / self.model.sr
            self._finish(stream, Done(Usage(stream.text_tokens, stream.tokens, audio_s,
                                            stream.first_chunk or now, now), list(stream.speech)))

    def _streamer(self, stream: _Stream):
        from ..s3gen_fast import modes_of
        from .frontend import tail_tokens

        if stream.streamer is None:
            max_tokens = stream.t3.max_new_tokens + len(tail_tokens(self.family))
            stream.streamer = S3GenStreamer(
                self.model.s3gen, stream.conds.gen, max_tokens, context_tokens=stream.request.context_tokens,
                watermarker=self.model.watermarker if stream.request.watermark else None,
                sample_rate=self.model.sr, modes=modes_of(self.model), generator=stream.s3_generator)
        return stream.streamer

    def _chunk_ids(self, stream: _Stream, final: bool) -> torch.Tensor:
        from .frontend import tail_tokens

        ids = stream.pending + (tail_tokens(self.family) if final else [])
        stream.pending = []
        stream.speech += ids
        return torch.tensor(ids, dtype=torch.long)

    def _finish(self, stream: _Stream, event) -> None:
        """The stream's last event. The engine's books are settled first, so a caller woken by
        the event sees the slot free and the request counted out."""
        if stream.t3 is not None and self._running.get(id(stream.t3)) is stream:
            del self._running[id(stream.t3)]
        stream.streamer = None
        with self._lock:
            self._in_flight -= 1
        if event is not None:
            stream.put(event)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            inbox, self._inbox = list(self._inbox), deque()
        streams = [item for kind, item in inbox if kind == "submit"] + list(self._waiting) + list(self._running.values())
        self._waiting.clear()
        self._running.clear()
        if self._decoder is not None:
            self._decoder.reset()
        for stream in streams:
            self._finish(stream, Failed(error))

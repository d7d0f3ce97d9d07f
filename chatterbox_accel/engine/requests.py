"""What callers hand the engine and what they get back: a request, its events, its handle.

    handle = engine.submit(SpeechRequest("Hello there.", seed=7))
    for event in handle:                 # or: async for event in handle
        if isinstance(event, AudioChunk):
            play(event.audio)            # 1-D float32 at the model's rate, on the CPU
    # the last event is Done (usage) or Failed (the error)

A handle is safe to read from any one thread or event loop while the engine's thread writes to
it. `handle.cancel()`, stopping its iteration early, or dropping the last reference to it (the
engine holds it weakly) frees the request's slot at the engine's next step boundary.
"""
from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from dataclasses import dataclass, field


class EngineBusy(RuntimeError):
    """The engine's admission queue is full: try again later (a server answers 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(RuntimeError):
    """The engine was closed before (or while) the request ran."""


@dataclass
class SpeechRequest:
    """One utterance to synthesize and stream."""

    text: str
    voice: str | None = None        # a voice id registered with the engine; None: the model's built-in voice
    options: dict = field(default_factory=dict)  # the model's generate() options (exaggeration, cfg_weight, ...)
    seed: int | None = None         # own generator for T3 sampling, CFM noise and vocoder draws; None: global RNG
    max_new_tokens: int | None = None  # T3 limit (None: the family's generate() default)
    chunk_size: int = 25            # speech tokens of the second audio chunk (25 = 1 s)
    first_chunk_size: int = 12      # tokens of the first chunk: a small one starts playback early
    max_chunk_size: int | None = 100  # later chunks double up to this (None: every chunk chunk_size)
    context_tokens: int | None = 100  # earlier tokens S3Gen re-reads per chunk (None: all)
    watermark: bool = True

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("text is empty: pass the sentence to speak")
        for name in ("chunk_size", "first_chunk_size", "max_chunk_size", "context_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is None and name in ("context_tokens", "max_new_tokens", "max_chunk_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (speech tokens; 25 per second of audio), "
                                 f"got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


def chunk_target(request: SpeechRequest, index: int) -> int:
    """Speech tokens of chunk `index`: first_chunk_size, then chunk_size, then doubling up to
    max_chunk_size. Every chunk re-runs S3Gen over the voice prompt and up to context_tokens
    earlier tokens, so fewer, larger chunks later cut a stream's total S3Gen work (a 15 s
    utterance: 6 passes instead of 15) while the first audio still comes after 12 tokens."""
    if index == 0:
        return request.first_chunk_size
    if request.max_chunk_size is None:
        return request.chunk_size
    return max(request.chunk_size, min(request.max_chunk_size, request.chunk_size << (index - 1)))


@dataclass
class AudioChunk:
    audio: object             # torch.Tensor (samples,) float32, CPU
    index: int
    samples_so_far: int
    sample_rate: int
    elapsed: float            # seconds since submit
    final: bool


@dataclass
class Usage:
    text_tokens: int
    speech_tokens: int
    audio_seconds: float
    time_to_first_chunk: float  # seconds from submit to the first chunk
    total_seconds: float        # seconds from submit to done

    @property
    def rtf(self) -> float:
        return self.total_seconds / self.audio_seconds if self.audio_seconds else math.inf


@dataclass
class Done:
    usage: Usage
    speech_tokens: list = field(default_factory=list)  # the ids S3Gen synthesized (what T3 decoded, cleaned)


@dataclass
class Failed:
    error: BaseException      # raise it, or map it to a status (EngineBusy, EngineClosed, ValueError, ...)


class Handle:
    """A request's events, in order: AudioChunk..., then Done or Failed. Iterate it (sync or
    async); `result()` waits and returns (concatenated audio, usage) or raises the failure."""

    def __init__(self, engine, request: SpeechRequest):
        self.engine, self.request = engine, request
        self._events: deque = deque()
        self._cond = threading.Condition()
        self._waiters: list = []  # (loop, future) of async readers
        self.finished = False     # Done or Failed was put
        self.cancelled = False

    # ---- the engine's side ----------------------------------------------------------------------
    def put(self, event) -> None:
        with self._cond:
            if self.finished:
                return
            self._events.append(event)
            self.finished = isinstance(event, (Done, Failed))
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)

    # ---- the caller's side ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the request: its slot is freed at the next step; a Failed(EngineClosed-like
        cancellation) ends the events."""
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.engine.cancel(self)

    close = cancel

    def get(self, timeout: float | None = None):
        """The next event (blocking)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._events, timeout):
                raise TimeoutError("no event within the timeout")
            return self._events.popleft()

    def __iter__(self):
        try:
            while True:
                event = self.get()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            self.cancel()  # a reader that stops early frees the slot

    async def aget(self):
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._events:
                    return self._events.popleft()
                future = loop.create_future()
                self._waiters.append((loop, future))
            await future

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        try:
            while True:
                event = await self.aget()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            self.cancel()

    def result(self, timeout: float | None = None):
        """(audio (samples,) float32 tensor, Usage); raises the failure."""
        import torch

        chunks = []
        for event in self:
            if isinstance(event, AudioChunk):
                chunks.append(event.audio)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return (torch.cat(chunks) if chunks else torch.zeros(0)), event.usage
        raise EngineClosed("the request ended without a result")


def _wake(future) -> None:
    if not future.done():
        future.set_result(None)

"""The server's Prometheus metrics (prometheus-client), one registry per app.

Per request: time to first audio, end-to-end latency, real-time factor, audio seconds, the
interval between chunks, and the underrun: the longest silence a player that starts at the
first chunk and plays in real time would hear (0 when every chunk came in time). The engine's
queue depth, running requests and failure counts are read at scrape time.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.engine = engine
        Gauge("chatterbox_queue_depth", "requests waiting for a decoder slot", registry=registry).set_function(
            lambda: max(0, engine.in_flight - engine.running))
        Gauge("chatterbox_running_requests", "requests decoding in the engine", registry=registry).set_function(
            lambda: engine.running)
        self.responses = Gauge("chatterbox_open_responses", "speech responses being sent", registry=registry)
        self.requests = Counter("chatterbox_requests", "speech requests by outcome", ["status"], registry=registry)
        self.rejections = Counter("chatterbox_rejections", "requests refused before any work", ["reason"],
                                  registry=registry)
        self.first_audio = Histogram("chatterbox_time_to_first_audio_seconds", "submit to the first audio bytes",
                                     buckets=_LATENCY, registry=registry)
        self.latency = Histogram("chatterbox_request_seconds", "submit to the last audio bytes",
                                 buckets=_LATENCY, registry=registry)
        self.rtf = Histogram("chatterbox_rtf", "request seconds per audio second",
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=registry)
        self.audio = Counter("chatterbox_audio_seconds", "audio seconds sent", registry=registry)
        self.interval = Histogram("chatterbox_chunk_interval_seconds", "time between a request's audio chunks",
                                  buckets=_LATENCY, registry=registry)
        self.underrun = Histogram("chatterbox_underrun_seconds", "longest gap a real-time player would hear",
                                  buckets=(0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=registry)
        registry.register(_EngineFailures(engine))


class _EngineFailures:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        family = CounterMetricFamily("chatterbox_engine_failures", "engine failures by kind", labels=["kind"])
        for kind, count in dict(self.engine.failures).items():
            family.add_metric([kind], count)
        yield family


class Playback:
    """A request's chunk timing as a real-time player hears it."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.first: float | None = None   # seconds since submit of the first audio
        self.last: float | None = None
        self.played = 0                   # samples before the current chunk
        self.underrun = 0.0

    def chunk(self, at: float, samples: int) -> float | None:
        """Record a chunk arriving `at` s after submit; returns the interval since the last one
        (None for the first)."""
        interval = None
        if self.first is None:
            self.first = at
        else:
            interval = at - self.last
            due = self.first + self.played / self.sample_rate  # when a player would need it
            self.underrun = max(self.underrun, at - due)
        self.last = at
        self.played += samples
        return interval

"""`OptimizedChatterboxTTS`: a `ChatterboxTTS` that is accelerated as it loads.

Same constructor, same `generate()`; `from_pretrained` / `from_local` take an extra
`optimizations={...}` dict of `AccelConfig` options and keep the report on `.accel_report`.
"""
from __future__ import annotations

from chatterbox.tts import ChatterboxTTS

from .api import accelerate, restore
from .checkpoints import download_english
from .config import AccelConfig
from .stream import generate_stream


class OptimizedChatterboxTTS(ChatterboxTTS):
    accel_report = None

    @classmethod
    def from_local(cls, ckpt_dir, device, optimizations: dict | None = None) -> "OptimizedChatterboxTTS":
        AccelConfig.from_options(optimizations)  # bad options fail before seconds of loading
        model = super().from_local(ckpt_dir, device)  # builds cls(...) with chatterbox's own loader
        model.accelerate(**(optimizations or {}))
        return model

    @classmethod
    def from_pretrained(cls, device, optimizations: dict | None = None) -> "OptimizedChatterboxTTS":
        """Download (or reuse the cached) official weights from the Hugging Face hub, as upstream does."""
        AccelConfig.from_options(optimizations)
        return cls.from_local(download_english(), device, optimizations=optimizations)

    def accelerate(self, **options):
        """(Re-)apply the optimizations with new options; returns the report."""
        self.accel_report = accelerate(self, **options)
        return self.accel_report

    def generate_stream(self, text, **options):
        """Yield `(audio_chunk, metrics)` while decoding; see `chatterbox_accel.generate_stream`."""
        return generate_stream(self, text, **options)

    def restore(self):
        """Back to the original chatterbox code paths."""
        restore(self)

"""Drop-in classes: a Chatterbox model that is accelerated as it loads.

`OptimizedChatterboxTTS`, `OptimizedChatterboxMultilingualTTS`, `OptimizedChatterboxTurboTTS`:
same constructor and `generate()` as chatterbox's class; `from_pretrained` / `from_local` take
an extra `optimizations={...}` dict of `AccelConfig` options and keep the report on
`.accel_report`; `generate_stream()` yields `(audio_chunk, metrics)`.
"""
from __future__ import annotations

import contextvars

from chatterbox.mtl_tts import ChatterboxMultilingualTTS
from chatterbox.tts import ChatterboxTTS
from chatterbox.tts_turbo import ChatterboxTurboTTS

from .api import accelerate, restore
from .checkpoints import download_english
from .config import AccelConfig
from .stream import generate_stream

# Upstream's from_pretrained downloads, then calls cls.from_local(folder, device): the options
# of the from_pretrained call in progress reach that from_local through this variable.
_PENDING = contextvars.ContextVar("chatterbox_accel_pending_optimizations", default=None)


class _Accelerated:
    accel_report = None

    @classmethod
    def from_local(cls, ckpt_dir, device, optimizations: dict | None = None):
        options = optimizations if optimizations is not None else _PENDING.get()
        AccelConfig.from_options(options)  # bad options fail before seconds of loading
        model = super().from_local(ckpt_dir, device)  # builds cls(...) with chatterbox's own loader
        model.accelerate(**(options or {}))
        return model

    @classmethod
    def from_pretrained(cls, device, optimizations: dict | None = None):
        """Download (or reuse the cached) official weights from the Hugging Face hub, as upstream does."""
        AccelConfig.from_options(optimizations)
        token = _PENDING.set(optimizations)
        try:
            return super().from_pretrained(device)
        finally:
            _PENDING.reset(token)

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


class OptimizedChatterboxTTS(_Accelerated, ChatterboxTTS):
    @classmethod
    def from_pretrained(cls, device, optimizations: dict | None = None) -> "OptimizedChatterboxTTS":
        """Download (or reuse the cached) official weights from the Hugging Face hub, as upstream does."""
        AccelConfig.from_options(optimizations)
        return cls.from_local(download_english(), device, optimizations=optimizations)


class OptimizedChatterboxMultilingualTTS(_Accelerated, ChatterboxMultilingualTTS):
    pass


class OptimizedChatterboxTurboTTS(_Accelerated, ChatterboxTurboTTS):
    pass

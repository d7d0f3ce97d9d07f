"""`OptimizedChatterboxTTS`: a `ChatterboxTTS` that is accelerated as it loads.

Same constructor, same `generate()`; `from_pretrained` / `from_local` take an extra
`optimizations={...}` dict of `AccelConfig` options and keep the report on `.accel_report`.
"""
from __future__ import annotations

from pathlib import Path

from chatterbox.tts import REPO_ID, ChatterboxTTS

from .api import accelerate, restore
from .config import AccelConfig

ENGLISH_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")


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
        from huggingface_hub import hf_hub_download

        AccelConfig.from_options(optimizations)
        local_path = None
        for fname in ENGLISH_FILES:
            local_path = hf_hub_download(repo_id=REPO_ID, filename=fname)
        return cls.from_local(Path(local_path).parent, device, optimizations=optimizations)

    def accelerate(self, **options):
        """(Re-)apply the optimizations with new options; returns the report."""
        self.accel_report = accelerate(self, **options)
        return self.accel_report

    def restore(self):
        """Back to the original chatterbox code paths."""
        restore(self)

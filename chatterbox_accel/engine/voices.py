"""The engine's voice registry: a voice id -> its conditionals, computed once, never written to
the model.

A voice is registered by id with a reference audio file (checked now: readable, long enough,
Turbo's > 5 s) or a voice profile (`save_voice`). Its conditionals are computed on first use, on
the engine's thread (the only thread that touches the model), by the model's own
`prepare_conditionals` with `model.conds` put back afterwards, and kept exaggeration-free on the
CPU (`voice.Voice`: a request's exaggeration is applied per request). The registry is bounded:
at most `max_voices` computed voices and `max_bytes` of their tensors, least recently used
dropped first (a dropped voice stays registered and is recomputed on its next use).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..voice import Voice, check_reference_audio

DEFAULT = "default"  # the model's built-in voice


def _cpu(value):
    return value.detach().to("cpu") if torch.is_tensor(value) else value


def voice_bytes(voice: Voice) -> int:
    tensors = [voice.speaker_emb, voice.cond_prompt_speech_tokens, *voice.gen.values()]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class VoiceRegistry:
    def __init__(self, model, max_voices: int = 16, max_bytes: int = 256 << 20):
        self.model, self.max_voices, self.max_bytes = model, max_voices, max_bytes
        self.sources: dict[str, tuple[str, str]] = {}  # id -> ("audio" | "profile", path)
        self.computed: OrderedDict[str, Voice] = OrderedDict()
        self.lock = threading.Lock()
        conds = getattr(model, "conds", None)
        if conds is not None:  # the built-in voice, as the model holds it now
            self.computed[DEFAULT] = self._on_cpu(Voice.from_conds(conds))

    def add(self, voice_id: str, path) -> None:
        """Register `path` (reference audio, or a .pt voice profile) under `voice_id`; raises a
        ValueError/FileNotFoundError naming the problem before any model work."""
        if not isinstance(voice_id, str) or not voice_id or voice_id == DEFAULT:
            raise ValueError(f"voice id {voice_id!r} is not usable: pass a non-empty name other than {DEFAULT!r}")
        path = Path(path)
        kind = "profile" if path.suffix == ".pt" else "audio"
        if kind == "audio":
            check_reference_audio(path, self.model)  # Turbo: more than 5 s
        elif not path.is_file():
            raise FileNotFoundError(f"voice profile {str(path)!r} does not exist")
        with self.lock:
            self.sources[voice_id] = (kind, str(path))
            self.computed.pop(voice_id, None)

    def remove(self, voice_id: str) -> None:
        with self.lock:
            if self.sources.pop(voice_id, None) is None:
                raise KeyError(f"no voice {voice_id!r}")
            self.computed.pop(voice_id, None)

    def names(self) -> list[str]:
        with self.lock:
            return ([DEFAULT] if DEFAULT in self.computed else []) + sorted(self.sources)

    def __contains__(self, voice_id) -> bool:
        return voice_id in (None, DEFAULT) and DEFAULT in self.computed or voice_id in self.sources

    def conditionals(self, voice_id: str | None, exaggeration: float):
        """The model's Conditionals for `voice_id` at `exaggeration` (engine thread only)."""
        voice_id = voice_id or DEFAULT
        with self.lock:
            voice = self.computed.get(voice_id)
            if voice is not None:
                self.computed.move_to_end(voice_id)
            source = self.sources.get(voice_id)
        if voice is None:
            if source is None:
                raise KeyError(f"unknown voice {voice_id!r}; registered: {', '.join(self.names()) or 'none'}")
            voice = self._compute(*source)
            with self.lock:
                self.computed[voice_id] = voice
                self._evict(keep=voice_id)
        return voice.conditionals(exaggeration, self.model.device)

    def _compute(self, kind: str, path: str) -> Voice:
        model, saved = self.model, getattr(self.model, "conds", None)
        try:
            if kind == "profile":
                from ..voice import load_voice

                load_voice(model, path)
            else:
                model.prepare_conditionals(path)
            return self._on_cpu(Voice.from_conds(model.conds))
        finally:
            model.conds = saved  # the registry never leaves the model's voice changed

    @staticmethod
    def _on_cpu(voice: Voice) -> Voice:
        return Voice(_cpu(voice.speaker_emb), _cpu(voice.cond_prompt_speech_tokens),
                     {k: _cpu(v) for k, v in voice.gen.items()}, voice.conds_cls)

    def _evict(self, keep: str) -> None:
        def total():
            return sum(voice_bytes(v) for v in self.computed.values())

        while len(self.computed) > 1 and (len(self.computed) > self.max_voices or total() > self.max_bytes):
            oldest = next(k for k in self.computed if k not in (keep, DEFAULT))
            del self.computed[oldest]

"""Voice-conditioning cache: `prepare_conditionals` once per reference audio, then reuse.

chatterbox re-runs the whole reference pipeline (load, resample, S3 tokenizer, voice encoder,
CAMPPlus x-vector, mel) on every `generate(audio_prompt_path=...)`. Here the model's
`prepare_conditionals` is wrapped: the result is cached under the SHA-256 of the file's bytes
(not its name; a changed file is a new key) plus any extra options (Turbo's `norm_loudness`,
its default filled in, so passing the default explicitly or not is the same key).
Exaggeration only sets `emotion_adv`, so it is applied on every hit and is not part of the key.
ChatterboxVC's `set_target_voice(wav_fpath)` (S3Gen reference only) is cached the same way.
The cache is an LRU of `size` entries. `save_voice` / `load_voice` store a voice as a profile
file tied to the model family and its conditioning weights by a fingerprint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .families import FAMILIES, conditionals_class, family_of

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "chatterbox_accel.voice/1"
MIN_SECONDS = 1.0
MIN_SAMPLE_RATE = 16000
SILENCE_PEAK = 1e-4


# ---- reference audio validation -------------------------------------------------------------
TURBO_MIN_SECONDS = 5.0  # ChatterboxTurboTTS.prepare_conditionals asserts a reference longer than 5 s


def check_reference_audio(path, model=None) -> Path:
    """Raise a clear error for a reference file chatterbox cannot use well; return the path.
    With the model: its family's own rule too (Turbo asserts more than 5 s, late, in its
    prepare_conditionals; here it is a ValueError before any work)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference audio {str(path)!r} does not exist; pass the path to a WAV/FLAC/MP3 file")
    if path.stat().st_size == 0:
        raise ValueError(f"reference audio {str(path)!r} is empty (0 bytes); record or pick another file")
    samples, sr = _read_audio(path)
    seconds = samples.shape[0] / sr
    if sr < MIN_SAMPLE_RATE:
        raise ValueError(f"reference audio {str(path)!r} is sampled at {sr} Hz; chatterbox needs at least "
                         f"{MIN_SAMPLE_RATE} Hz (its tokenizer runs at 16 kHz, its decoder at 24 kHz): "
                         "use a wideband recording")
    if seconds < MIN_SECONDS:
        raise ValueError(f"reference audio {str(path)!r} is {seconds:.2f} s long; use at least "
                         f"{MIN_SECONDS:.0f} s of speech (5-10 s works best)")
    if float(abs(samples).max()) < SILENCE_PEAK:
        raise ValueError(f"reference audio {str(path)!r} is silent (peak below {SILENCE_PEAK}); "
                         "use a recording of the voice to clone")
    if model is not None and seconds <= TURBO_MIN_SECONDS:
        from .families import family_of

        if family_of(model) == "turbo":
            raise ValueError(f"reference audio {str(path)!r} is {seconds:.1f} s long; Turbo needs more than "
                             f"{TURBO_MIN_SECONDS:.0f} s of speech (its prepare_conditionals asserts it)")
    return path


def _read_audio(path: Path):
    """(samples as a 1-D numpy array of up to 10 s, sample rate)."""
    import numpy as np

    try:
        import soundfile as sf

        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            data = f.read(frames=min(f.frames, 10 * sr), dtype="float32", always_2d=True)
        return np.asarray(data).mean(axis=1), sr
    except Exception as sf_error:
        try:  # formats soundfile cannot read, through librosa's audioread fallback
            import librosa

            data, sr = librosa.load(str(path), sr=None, mono=True, duration=10.0)
            return data, sr
        except Exception:
            raise ValueError(f"could not read {str(path)!r} as audio ({sf_error}); "
                             "pass a WAV, FLAC, OGG or MP3 file") from None


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """Hash of the weights conditioning depends on (voice encoder, S3Gen) and the T3 prompt length."""
    digest = hashlib.sha256(str(model.t3.hp.speech_cond_prompt_len).encode())
    for module in (model.ve, model.s3gen):
        for name, tensor in module.state_dict().items():
            sample = tensor.detach().reshape(-1)[:64].float().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- the cache ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Voice:
    """Exaggeration-free conditionals of one reference audio."""

    speaker_emb: torch.Tensor
    cond_prompt_speech_tokens: torch.Tensor | None
    gen: dict
    conds_cls: type | None = None  # the family's Conditionals class (None: chatterbox.tts's)

    @classmethod
    def from_conds(cls, conds) -> "Voice":
        return cls(conds.t3.speaker_emb, conds.t3.cond_prompt_speech_tokens, dict(conds.gen), type(conds))

    def conditionals(self, exaggeration: float, device):
        """Fresh `Conditionals`, built as chatterbox's `prepare_conditionals` builds them."""
        from chatterbox.models.t3.modules.cond_enc import T3Cond

        if self.conds_cls is not None:
            Conditionals = self.conds_cls
        else:
            from chatterbox.tts import Conditionals

        t3_cond = T3Cond(
            speaker_emb=self.speaker_emb,
            cond_prompt_speech_tokens=self.cond_prompt_speech_tokens,
            emotion_adv=exaggeration * torch.ones(1, 1, 1),
        ).to(device=device)
        return Conditionals(t3_cond, dict(self.gen))


class VoiceCache:
    """LRU of `Voice`s keyed by (audio SHA-256, extra options). Thread-safe; `lock` also
    serialises a miss's computation with the read of what it produced (see below)."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.RLock()

    def get(self, key) -> Voice | None:
        with self.lock:
            voice = self.entries.get(key)
            if voice is not None:
                self.entries.move_to_end(key)
                self.hits += 1
            return voice

    def put(self, key, voice: Voice) -> None:
        with self.lock:
            self.entries[key] = voice
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


class CachedPrepareConditionals:
    """wrapt wrapper for `model.prepare_conditionals(wav_fpath, exaggeration=0.5, **extra)`."""

    def __init__(self, cache: VoiceCache):
        self.cache = cache

    def __call__(self, wrapped, instance, args, kwargs):
        try:
            wav_fpath, exaggeration, extra = _split_args(args, kwargs, wrapped)
        except TypeError:
            return wrapped(*args, **kwargs)  # arguments the original does not take: its own error
        path = check_reference_audio(wav_fpath, instance)
        key = (file_sha256(path), tuple(sorted(extra.items())))
        # Under the cache's lock: two threads preparing different voices on one model would
        # otherwise interleave, and a miss could store the other thread's conds under its key.
        with self.cache.lock:
            voice = self.cache.get(key)
            if voice is None:
                self.cache.misses += 1
                wrapped(str(path), exaggeration=exaggeration, **extra)
                self.cache.put(key, Voice.from_conds(instance.conds))
                return None
        instance.conds = voice.conditionals(exaggeration, instance.device)
        return None


class CachedSetTargetVoice:
    """wrapt wrapper for ChatterboxVC's `set_target_voice(wav_fpath)`: the S3Gen reference dict
    (`embed_ref` of the first 10 s) is a function of the audio bytes and S3Gen's weights only,
    so a hit sets a fresh copy of the cached dict, exactly what the original would compute."""

    def __init__(self, cache: VoiceCache):
        self.cache = cache

    def __call__(self, wrapped, instance, args, kwargs):
        try:
            bound = inspect.signature(wrapped).bind(*args, **kwargs)
        except (TypeError, ValueError):
            return wrapped(*args, **kwargs)
        path = check_reference_audio(bound.arguments["wav_fpath"])
        key = (file_sha256(path), "set_target_voice")
        voice = self.cache.get(key)
        if voice is None:
            self.cache.misses += 1
            wrapped(str(path))
            self.cache.put(key, Voice(None, None, dict(instance.ref_dict)))
            return None
        instance.ref_dict = dict(voice.gen)
        return None


def _split_args(args, kwargs, fn=None):
    """(wav_fpath, exaggeration, extra options) of a prepare_conditionals call; with `fn`, the
    extra options get `fn`'s defaults filled in (TypeError when `fn` cannot take the call)."""
    if fn is not None:
        signature = _signature(fn)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        kwargs, args = {}, ()
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError("extra positional arguments")
            else:
                kwargs[name] = value
    kwargs = dict(kwargs)
    if args:
        kwargs.setdefault("wav_fpath", args[0])
        if len(args) > 1:
            kwargs.setdefault("exaggeration", args[1])
    if "wav_fpath" not in kwargs:
        raise TypeError("no wav_fpath argument")
    wav_fpath = kwargs.pop("wav_fpath")
    exaggeration = kwargs.pop("exaggeration", 0.5)
    return wav_fpath, exaggeration, kwargs


def _signature(fn) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(str(exc)) from None


def _default_options(model) -> tuple:
    """The cache-key options of a default `model.prepare_conditionals(path)` call."""
    try:
        _, _, extra = _split_args(("<path>",), {}, model.prepare_conditionals)
    except TypeError:
        return ()
    return tuple(sorted(extra.items()))


# ---- voice profiles ------------------------------------------------------------------------------
def save_voice(model, audio_path, profile_path) -> Path:
    """Compute (or reuse) the conditionals of `audio_path` and store them in `profile_path`."""
    family = _profile_family(model)
    audio_path = check_reference_audio(audio_path, model)
    model.prepare_conditionals(str(audio_path))
    voice = Voice.from_conds(model.conds)
    payload = {
        "format": PROFILE_FORMAT,
        "family": family,
        "options": _default_options(model),
        "model_fingerprint": model_fingerprint(model),
        "audio_sha256": file_sha256(audio_path),
        "speaker_emb": voice.speaker_emb.cpu(),
        "cond_prompt_speech_tokens": None if voice.cond_prompt_speech_tokens is None
        else voice.cond_prompt_speech_tokens.cpu(),
        "gen": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in voice.gen.items()},
    }
    profile_path = Path(profile_path)
    torch.save(payload, profile_path)
    return profile_path


def load_voice(model, profile_path, exaggeration: float = 0.5) -> None:
    """Set `model.conds` from a profile written by `save_voice` for this same model."""
    profile_path = Path(profile_path)
    if not profile_path.is_file():
        raise FileNotFoundError(f"voice profile {str(profile_path)!r} does not exist; create it with save_voice()")
    try:
        payload = torch.load(profile_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(profile_path)!r} is not a chatterbox_accel voice profile ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{str(profile_path)!r} is not a chatterbox_accel voice profile "
                         f"(expected format {PROFILE_FORMAT!r})")
    family = _profile_family(model)
    saved_family = payload.get("family", "english")  # profiles from before families were recorded
    if saved_family != family:
        raise ValueError(f"voice profile {str(profile_path)!r} was made with a {saved_family} model "
                         f"({_FAMILY_CLASS.get(saved_family, saved_family)}), but this model is {family} "
                         f"({type(model).__name__}): voice conditioning is not shared across model "
                         "families; re-create the profile with save_voice() on this model")
    expected = model_fingerprint(model)
    if payload["model_fingerprint"] != expected:
        raise ValueError(f"voice profile {str(profile_path)!r} was made with a different model "
                         f"(fingerprint {payload['model_fingerprint']}, this model {expected}); "
                         "re-create it with save_voice() on this model")
    device = model.device
    gen = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in payload["gen"].items()}
    tokens = payload["cond_prompt_speech_tokens"]
    voice = Voice(payload["speaker_emb"].to(device), None if tokens is None else tokens.to(device), gen,
                  conditionals_class(model))
    model.conds = voice.conditionals(exaggeration, device)
    cache = _cache_of(model)
    if cache is not None:
        cache.put((payload["audio_sha256"], tuple(payload.get("options", ()))), voice)


_FAMILY_CLASS = {name: f.class_name for name, f in FAMILIES.items()}


def _profile_family(model) -> str:
    """The model's family for a voice profile; VC (no T3 conditionals) gets a clear error."""
    family = family_of(model) or "english"
    if family == "vc":
        raise ValueError("voice profiles store T3 and S3Gen conditionals of a TTS model; ChatterboxVC has "
                         "no T3 and is not supported: its set_target_voice() is cached by accelerate() instead")
    return family


def _cache_of(model) -> VoiceCache | None:
    from .patching import get_registry

    registry = get_registry(model)
    return None if registry is None else registry.state.get("voice_cache")

"""`generate_stream()`: audio chunks while T3 is still decoding.

Per chunk:
1. T3 yields a block of speech tokens: the fast runner's `token_blocks` (English, Multilingual,
   Turbo), while it decodes. A model without the fast path runs its own `generate()` up to the
   point it would call S3Gen, and the tokens it would synthesize are streamed.
2. `s3gen_stream.S3GenStreamer` turns them into audio: S3Gen's flow over the voice prompt, some
   earlier tokens and the new ones; HiFT on the new frames with its excitation carried over; the
   watermark (that module says how a chunk's audio is made and how close it stays to one-shot).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .families import FAMILIES, REQUIRED as _REQUIRED, family_of, generate_options as _generate_options
from .s3gen_fast import modes_of
from .s3gen_stream import S3GenStreamer

logger = logging.getLogger(__name__)

SPEECH_VOCAB = 6561          # ids >= this are T3 specials (BOS/EOS), never sent to S3Gen
MULTILINGUAL_MAX_NEW_TOKENS = FAMILIES["multilingual"].t3_max_new_tokens  # generate() hard-codes it
TURBO_MAX_TOKENS = 1 + FAMILIES["turbo"].t3_max_new_tokens + 3  # the first token + max_gen_len, + generate()'s silence
# generate_stream()'s own options (the rest are the model's generate() options)
STREAM_DEFAULTS = dict(max_new_tokens=1000, chunk_size=25, first_chunk_size=None, context_tokens=100,
                       watermark=True, seed=None)
S3_SEED_OFFSET = 0x5EED  # a seeded request's S3Gen generator: seed + this (T3's: the seed itself)


@dataclass
class StreamMetrics:
    """What the stream has done so far, sent with each chunk."""

    chunk_index: int
    chunk_samples: int
    samples_so_far: int
    sample_rate: int
    time_to_first_chunk: float  # seconds from the first next() to the first chunk
    elapsed: float              # seconds since the first next()
    t3_tokens: int              # speech tokens decoded so far
    t3_seconds: float           # time spent in T3 so far
    final: bool

    @property
    def audio_seconds(self) -> float:
        return self.samples_so_far / self.sample_rate

    @property
    def rtf(self) -> float:
        """Running real-time factor: elapsed time / audio produced (below 1 keeps up)."""
        return self.elapsed / self.audio_seconds if self.samples_so_far else math.inf

    @property
    def t3_it_s(self) -> float:
        return self.t3_tokens / self.t3_seconds if self.t3_seconds else 0.0


# ---- the generator ----------------------------------------------------------------------------
def generate_stream(model, text, **options):
    """Stream `model.generate(text, **options)`: yields `(audio_chunk, StreamMetrics)`, the chunk
    a 1-D float tensor at `model.sr`. Takes the model's own `generate()` options (English,
    Multilingual with `language_id`, Turbo), plus:
      max_new_tokens   T3 limit (English fast path; other models keep generate()'s own limit)
      chunk_size       speech tokens per chunk (25 = 1 s of audio), default 25
      first_chunk_size a smaller first chunk starts playback early, default min(chunk_size, 12)
      context_tokens   earlier tokens S3Gen re-reads per chunk (None: all), default 100
      watermark        default True, as generate()
      seed             this stream's own generators (T3 sampling: seed; S3Gen noise and vocoder
                       draws: seed + S3_SEED_OFFSET), as the engine's requests: the same speech
                       tokens as `SpeechRequest(text, seed=seed)`, and the global RNG untouched.
                       None (default): the global RNG, as generate()

    Arguments are checked now; the work starts at the first `next()`. Closing the generator
    early (break) frees its state and leaves the model usable.
    """
    why = stream_unsupported(model)
    if why:
        raise TypeError(f"generate_stream(): {why}")
    accepted = _generate_options(model)
    unknown = sorted(set(options) - set(accepted) - set(STREAM_DEFAULTS))
    if unknown:
        raise TypeError(f"generate_stream() got unknown option(s) {unknown}; {type(model).__name__} "
                        f"takes: {', '.join(list(accepted) + list(STREAM_DEFAULTS))}")
    stream = {k: options.pop(k, v) for k, v in STREAM_DEFAULTS.items()}
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: pass the sentence to speak, e.g. generate_stream(model, 'Hello.')")
    if stream["seed"] is not None and (isinstance(stream["seed"], bool) or not isinstance(stream["seed"], int)):
        raise ValueError(f"seed must be an int or None, got {stream['seed']!r}")
    for name in ("chunk_size", "first_chunk_size", "context_tokens"):
        value = stream[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 (speech tokens; 25 per second of "
                             f"audio), got {value!r}")
    if family_of(model) == "english":
        from .t3.patch import check_lengths

        check_lengths(model.t3.hp, None, stream["max_new_tokens"])
    elif stream["max_new_tokens"] != STREAM_DEFAULTS["max_new_tokens"]:
        raise ValueError(f"max_new_tokens applies to English ChatterboxTTS; {type(model).__name__} "
                         f"keeps its generate()'s own limit: drop the option")
    missing = [name for name, default in accepted.items() if default is _REQUIRED and name not in options]
    if missing:
        raise TypeError(f"generate_stream() needs {missing} for {type(model).__name__}, as generate() does")
    _check_language(model, options.get("language_id"))
    if options.get("audio_prompt_path") is not None:
        from .voice import check_reference_audio

        check_reference_audio(options["audio_prompt_path"], model)
    elif getattr(model, "conds", None) is None:
        raise ValueError("no voice: pass audio_prompt_path or call model.prepare_conditionals() first")
    stream["first_chunk_size"] = stream["first_chunk_size"] or min(stream["chunk_size"], 12)
    return _stream(model, text, options, **stream)


def stream_unsupported(model) -> str | None:
    """Why `generate_stream()` cannot serve `model` (None when it can)."""
    if not (hasattr(model, "t3") and hasattr(model, "s3gen") and callable(getattr(model, "generate", None))):
        return f"needs a Chatterbox text-to-speech model (.t3, .s3gen, .generate), got {type(model).__name__}"
    return None


def _check_language(model, language_id) -> None:
    if language_id is None or not getattr(model.t3.hp, "is_multilingual", False):
        return
    from chatterbox.mtl_tts import SUPPORTED_LANGUAGES

    if str(language_id).lower() not in SUPPORTED_LANGUAGES:
        raise ValueError(f"unsupported language_id {language_id!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")


def _stream(model, text, options, *, max_new_tokens, chunk_size, first_chunk_size, context_tokens,
            watermark, seed):
    start = time.perf_counter()
    t3_rng = s3_rng = None
    if seed is not None:
        t3_rng = torch.Generator(device=model.t3.device).manual_seed(seed)
        s3_rng = torch.Generator(device=model.s3gen.device).manual_seed(seed + S3_SEED_OFFSET)
    blocks, max_tokens = _token_source(model, text, options, max_new_tokens, first_chunk_size, chunk_size, t3_rng,
                                       seed)
    streamer = None
    index = samples = n_tokens = 0
    t3_seconds, first = 0.0, None
    try:
        while True:
            t = time.perf_counter()
            ids, final = next(blocks)
            t3_seconds += time.perf_counter() - t
            n_tokens += ids.numel()
            if streamer is None:  # after the first block: Multilingual/Turbo know the length now
                streamer = S3GenStreamer(model.s3gen, model.conds.gen, max_tokens(), context_tokens=context_tokens,
                                         watermarker=model.watermarker if watermark else None,
                                         sample_rate=model.sr, modes=modes_of(model), generator=s3_rng)
            audio = streamer.push(ids, final)
            if audio.numel() == 0 and not final:
                continue
            now = time.perf_counter()
            first = first if first is not None else now - start
            samples += audio.numel()
            yield audio.cpu(), StreamMetrics(index, audio.numel(), samples, model.sr, first, now - start,
                                             n_tokens, t3_seconds, final)
            index += 1
            if final:
                return
    finally:
        blocks.close()


def _token_source(model, text, options, max_new_tokens, first_block, block, generator=None, seed=None):
    """(blocks of (ids, final), a callable giving the most tokens there can be). generator: the
    fast path's T3 sampling generator; the original path seeds the global RNG with `seed`."""
    from .patching import state_of

    family = family_of(model)
    fast = state_of(model, "t3_inference") if family in ("english", "multilingual", "turbo") else None
    if fast is not None and fast.disabled is None:
        if family == "multilingual":
            max_new_tokens = MULTILINGUAL_MAX_NEW_TOKENS
        if family == "turbo":
            max_new_tokens = TURBO_MAX_TOKENS
        return (_fast_blocks(model, fast, text, options, max_new_tokens, first_block, block, generator, seed),
                lambda: max_new_tokens)
    box = {}
    return _generate_blocks(model, text, options, first_block, block, box, seed), lambda: box["n"]


def _fast_blocks(model, fast, text, options, max_new_tokens, first_block, block, generator=None, seed=None):
    """The fast runner (English, Multilingual, Turbo), block by block while it decodes; the
    original path if it fails before the first block."""
    opts = {**_generate_options(model), **options}
    tail = None
    if family_of(model) == "turbo":
        from chatterbox.models.s3gen.const import S3GEN_SIL

        t3_opts = {k: opts[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
        text_tokens = _prepare_turbo(model, text, opts)
        blocks = fast.stream(dict(t3_opts, t3_cond=model.conds.t3, text_tokens=text_tokens), first_block, block,
                             generator=generator)
        tail = torch.tensor([S3GEN_SIL] * 3)  # generate() appends 3 silence tokens before S3Gen
    else:
        text_tokens = _prepare(model, text, opts["audio_prompt_path"], opts["exaggeration"], opts["cfg_weight"],
                               opts.get("language_id"))
        t3_opts = {k: opts[k] for k in ("repetition_penalty", "min_p", "top_p", "cfg_weight", "temperature")}
        blocks = fast.stream(dict(t3_opts, t3_cond=model.conds.t3, text_tokens=text_tokens,
                                  max_new_tokens=max_new_tokens), first_block, block, generator=generator)
    try:
        ids, final = next(blocks)
    except Exception as exc:  # nothing streamed yet: the original T3 can still answer
        fast.disabled = f"{type(exc).__name__}: {exc}"
        logger.warning("chatterbox_accel: fast T3 decode failed (%s); this model now uses the "
                       "original T3.inference", fast.disabled)
        yield from _generate_blocks(model, text, options, first_block, block, {}, seed)
        return
    while True:
        ids = ids[ids < SPEECH_VOCAB]  # generate() drops EOS and any other special id
        yield (torch.cat([ids, tail.to(ids.device)]) if final and tail is not None else ids), final
        if final:
            return
        ids, final = next(blocks)


class _Captured(Exception):
    pass


def _generate_blocks(model, text, options, first_block, block, box, seed=None):
    """Run the model's own generate() up to its S3Gen call, then serve the speech tokens it would
    have synthesized, in blocks. `box["n"]` receives their number. The original T3 samples from
    the global RNG: a seed seeds it (torch.manual_seed), as a caller of generate() would."""
    captured = {}
    if seed is not None:
        torch.manual_seed(seed)

    def capture(speech_tokens, *args, **kwargs):
        captured["tokens"] = speech_tokens
        raise _Captured

    from .patching import shadowed

    try:
        with shadowed(model.s3gen, "inference", capture):  # for this call only
            model.generate(text, **options)
    except _Captured:
        pass
    ids = torch.atleast_1d(captured["tokens"].view(-1))
    box["n"] = ids.numel()
    start, size = 0, first_block
    while True:
        yield ids[start : start + size], start + size >= ids.numel()
        if start + size >= ids.numel():
            return
        start, size = start + size, block


def _prepare_turbo(model, text, opts):
    """`ChatterboxTurboTTS.generate` up to T3 (chatterbox 0.1.7): voice, warning, text tokens."""
    from chatterbox.tts_turbo import punc_norm

    if opts["audio_prompt_path"]:
        model.prepare_conditionals(opts["audio_prompt_path"], exaggeration=opts["exaggeration"],
                                   norm_loudness=opts["norm_loudness"])
    if opts["cfg_weight"] > 0.0 or opts["exaggeration"] > 0.0 or opts["min_p"] > 0.0:
        logger.warning("CFG, min_p and exaggeration are not supported by Turbo version and will be ignored.")
    tokens = model.tokenizer(punc_norm(text), return_tensors="pt", padding=True, truncation=True)
    return tokens.input_ids.to(model.device)


def _prepare(model, text, audio_prompt_path, exaggeration, cfg_weight, language_id=None):
    """`ChatterboxTTS.generate` (or `ChatterboxMultilingualTTS.generate`) up to T3, as in
    chatterbox 0.1.7: voice, exaggeration, text tokens."""
    text_tokens = text_tokens_for(model, text, cfg_weight, language_id)
    if audio_prompt_path:
        model.prepare_conditionals(audio_prompt_path, exaggeration=exaggeration)
    model.conds.t3 = with_exaggeration(model, model.conds.t3, exaggeration)
    return text_tokens


def with_exaggeration(model, t3_cond, exaggeration):
    """`t3_cond`, or a copy with `emotion_adv = exaggeration`, as the upstream generate() makes it."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    if exaggeration == t3_cond.emotion_adv[0, 0, 0]:
        return t3_cond
    return T3Cond(speaker_emb=t3_cond.speaker_emb, cond_prompt_speech_tokens=t3_cond.cond_prompt_speech_tokens,
                  emotion_adv=exaggeration * torch.ones(1, 1, 1)).to(device=model.device)


def text_tokens_for(model, text, cfg_weight, language_id=None):
    """T3's text tokens as `ChatterboxTTS.generate` / `ChatterboxMultilingualTTS.generate`
    (chatterbox 0.1.7) make them: punc_norm, tokenizer, CFG rows, start/stop text tokens."""
    if family_of(model) == "multilingual":  # its own punc_norm, language tag, and always two CFG rows
        from chatterbox.mtl_tts import punc_norm

        language = language_id.lower() if language_id else None
        text_tokens = model.tokenizer.text_to_tokens(punc_norm(text), language_id=language)
        text_tokens = torch.cat([text_tokens, text_tokens], dim=0)
    else:
        from chatterbox.tts import punc_norm

        text_tokens = model.tokenizer.text_to_tokens(punc_norm(text))
        if cfg_weight > 0.0:
            text_tokens = torch.cat([text_tokens, text_tokens], dim=0)
    text_tokens = F.pad(text_tokens.to(model.device), (1, 0), value=model.t3.hp.start_text_token)
    return F.pad(text_tokens, (0, 1), value=model.t3.hp.stop_text_token)

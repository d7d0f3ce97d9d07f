"""The engine's front end: a `SpeechRequest` -> the T3 request its model's `generate()` would
decode, per family, without touching `model.conds` (the voice comes from the engine's registry).

What each family's `generate()` does before T3 (chatterbox 0.1.7), and after it:
- English / Multilingual: options from generate()'s signature; conditionals with the request's
  exaggeration; `punc_norm` and the tokenizer (Multilingual: its language tag, always two CFG
  rows); start/stop text tokens; T3 with generate()'s sampling options. After T3: the speech ids
  below 6561 (EOS and the other specials dropped).
- Turbo: `punc_norm`, the GPT-2 tokenizer, `inference_turbo`'s sampling (top_k, top_p,
  temperature, repetition penalty; CFG, min_p and exaggeration unused, as upstream warns);
  after T3 the ids below 6561 and 3 silence tokens appended.
"""
from __future__ import annotations

from ..families import FAMILIES, REQUIRED, generate_options
from ..stream import SPEECH_VOCAB, _check_language, text_tokens_for
from ..t3.patch import check_lengths
from ..t3.sampling import validate


def options_for(model, request) -> dict:
    """generate()'s options with the request's over them; unknown or missing ones raise."""
    defaults = {k: v for k, v in generate_options(model).items() if k != "audio_prompt_path"}
    unknown = sorted(set(request.options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {type(model).__name__}; known: {sorted(defaults)}")
    options = {**defaults, **request.options}
    missing = [k for k, v in options.items() if v is REQUIRED]
    if missing:
        raise ValueError(f"{type(model).__name__} needs {missing} (its generate() has no default for them)")
    return options


def t3_request(model, runner, voices, request, generator, limit: int, key=None):
    """(T3Request, text tokens, Conditionals) for `request` (engine thread)."""
    from ..families import family_of

    family = family_of(model)
    options = options_for(model, request)
    max_new = min(request.max_new_tokens or FAMILIES[family].t3_max_new_tokens, limit)
    conds = voices.conditionals(request.voice, float(options.get("exaggeration", 0.5)))
    if family == "turbo":
        from chatterbox.tts_turbo import punc_norm

        from ..t3.turbo import TurboParams

        text = model.tokenizer(punc_norm(request.text), return_tensors="pt", padding=True, truncation=True)
        ids = text.input_ids.to(model.device)
        params = TurboParams.make(temperature=options["temperature"], top_k=options["top_k"],
                                  top_p=options["top_p"], repetition_penalty=options["repetition_penalty"])
        return runner.request(conds.t3, ids, params, max_new, generator, key=key), ids.shape[-1], conds
    validate(temperature=options["temperature"], repetition_penalty=options["repetition_penalty"],
             min_p=options["min_p"], top_p=options["top_p"])
    _check_language(model, options.get("language_id"))
    tokens = text_tokens_for(model, request.text, float(options["cfg_weight"]), options.get("language_id"))
    check_lengths(model.t3.hp, tokens, max_new)
    t3 = runner.request(conds.t3, tokens, options, max_new, generator, key=key)
    return t3, tokens.shape[-1] - 2, conds


def clean_tokens(runner, ids: list) -> list:
    """The speech ids S3Gen may read (generate() drops EOS and the other specials)."""
    return [i for i in ids if i < SPEECH_VOCAB]


def tail_tokens(family: str) -> list:
    """Ids generate() appends after T3's (Turbo: 3 silence tokens)."""
    if family != "turbo":
        return []
    from chatterbox.models.s3gen.const import S3GEN_SIL

    return [S3GEN_SIL] * 3

"""The model families chatterbox-tts 0.1.7 ships: the one table of what differs between them.

| family | class | T3 backbone, method | voice method |
|---|---|---|---|
| english | chatterbox.tts.ChatterboxTTS | Llama 520M, `inference` | prepare_conditionals |
| multilingual | chatterbox.mtl_tts.ChatterboxMultilingualTTS | Llama 520M + alignment analyzer (t3/alignment.py), `inference` | prepare_conditionals |
| turbo | chatterbox.tts_turbo.ChatterboxTurboTTS | GPT-2 medium, `inference_turbo` (t3/turbo.py) | prepare_conditionals |
| vc | chatterbox.vc.ChatterboxVC | none | set_target_voice |

Upstream's keyword defaults are read from upstream (`generate_options`, from the model's own
`generate()` signature), never copied; the table holds only what no signature says.
Nothing here imports chatterbox modules the app has not imported itself: a model can only be
an instance of a class whose module is already loaded.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    module: str                  # the chatterbox module defining the class
    class_name: str
    repo: str | None             # the Hugging Face repository from_pretrained() reads
    t3_method: str | None        # the T3 method generate() calls (None: no T3)
    voice_method: str            # reference audio -> conditioning
    voice_arg: str               # generate()'s reference-audio argument
    t3_max_new_tokens: int | None  # the T3 length generate() hard-codes in its body (no signature says it)
    batches: bool                # generate_batch() serves it


FAMILIES = {f.name: f for f in (
    Family("english", "chatterbox.tts", "ChatterboxTTS", "ResembleAI/chatterbox", "inference",
           "prepare_conditionals", "audio_prompt_path", 1000, True),
    Family("multilingual", "chatterbox.mtl_tts", "ChatterboxMultilingualTTS", "ResembleAI/chatterbox",
           "inference", "prepare_conditionals", "audio_prompt_path", 1000, True),
    Family("turbo", "chatterbox.tts_turbo", "ChatterboxTurboTTS", "ResembleAI/chatterbox-turbo",
           "inference_turbo", "prepare_conditionals", "audio_prompt_path", 1000, True),
    Family("vc", "chatterbox.vc", "ChatterboxVC", "ResembleAI/chatterbox", None, "set_target_voice",
           "target_voice_path", None, False),
)}
FAMILY_CLASSES = {name: (f.module, f.class_name) for name, f in FAMILIES.items()}

T3_FALLBACKS = {
    "vc": "ChatterboxVC has no T3 (its speech tokens come from the source audio); voice side only",
}


def family(model) -> Family | None:
    """The model's row of the table (None for something that is not a chatterbox model)."""
    name = family_of(model)
    return FAMILIES.get(name) if name else None


REQUIRED = object()  # an option generate() has no default for


def generate_options(model) -> dict:
    """generate()'s keyword options (name -> default, `REQUIRED` when it has none), minus the
    text: read from the model's own signature, so upstream's defaults are upstream's."""
    params = list(inspect.signature(model.generate).parameters.values())[1:]  # drop `text`
    return {p.name: (REQUIRED if p.default is p.empty else p.default) for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def family_of(model) -> str | None:
    """"english", "multilingual", "turbo", "vc", or None for something else.

    Chatterbox's own classes (and subclasses) are recognised by class; any other object
    with a chatterbox T3 by that T3 (GPT-2: turbo, 2454 text ids: multilingual, else english)."""
    for name, (module_name, class_name) in FAMILY_CLASSES.items():
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and isinstance(model, cls):
            return name
    t3 = getattr(model, "t3", None)
    t3_module = sys.modules.get("chatterbox.models.t3.t3")
    if t3_module is not None and isinstance(t3, t3_module.T3):
        if getattr(t3, "is_gpt", False):
            return "turbo"
        return "multilingual" if t3.hp.is_multilingual else "english"
    return None


def t3_fallback_reason(model) -> str | None:
    """Why no fast T3 decode loop is used for `model` (None when one is): only a model without
    a T3 (ChatterboxVC). Which loop serves a T3 is decided by the T3 itself (GPT-2: Turbo's
    loop; Llama: the Llama loop, with the alignment analyzer when multilingual), so a wrapper
    class holding one is treated alike."""
    t3 = getattr(model, "t3", None)
    if t3 is None:
        return T3_FALLBACKS["vc"]
    return None


def voice_method_of(model) -> str | None:
    """The method that turns a reference audio file into the model's voice conditioning."""
    name = FAMILIES["vc" if family_of(model) == "vc" else "english"].voice_method
    return name if callable(getattr(model, name, None)) else None


def conditionals_class(model):
    """The `Conditionals` dataclass of the model's own module (each family defines its own,
    with the same fields); chatterbox.tts's for anything else."""
    conds = getattr(model, "conds", None)
    if conds is not None and hasattr(conds, "t3") and hasattr(conds, "gen"):
        return type(conds)
    for klass in type(model).__mro__:
        cls = getattr(sys.modules.get(klass.__module__), "Conditionals", None)
        if cls is not None:
            return cls
    from chatterbox.tts import Conditionals

    return Conditionals


@contextlib.contextmanager
def pkuseg_unavailable():
    """Build a multilingual model without spacy_pkuseg: upstream's MTLTokenizer builds its
    segmenter, which downloads a model from GitHub and raises offline; upstream already handles
    `ImportError` (Chinese word segmentation off), so the import is made to fail meanwhile."""
    saved = sys.modules.get("spacy_pkuseg", "absent")
    sys.modules["spacy_pkuseg"] = None
    try:
        yield
    finally:
        if saved == "absent":
            sys.modules.pop("spacy_pkuseg", None)
        else:
            sys.modules["spacy_pkuseg"] = saved

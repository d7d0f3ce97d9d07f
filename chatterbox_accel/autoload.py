"""`CHATTERBOX_ACCEL=1 python app.py`: accelerate every Chatterbox model the app creates.

The installed `chatterbox_accel_autoload.pth` calls `install()` at interpreter start-up, and
only when CHATTERBOX_ACCEL is set to a true value. `install()` imports nothing heavy: it
registers post-import hooks, so when (and if) the app imports `chatterbox.tts`,
`chatterbox.mtl_tts`, `chatterbox.tts_turbo` or `chatterbox.vc`, that module's model class
(`ChatterboxTTS`, `ChatterboxMultilingualTTS`, `ChatterboxTurboTTS`, `ChatterboxVC`) gets its
`__init__` wrapped, in that process, to call `accelerate(self)` after the original constructor.
Options may be given as JSON in CHATTERBOX_ACCEL_OPTIONS.
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

TRUE = ("1", "true", "yes", "on")
# module -> model class whose constructor is wrapped (chatterbox-tts 0.1.7's four families)
MODEL_CLASSES = {
    "chatterbox.tts": "ChatterboxTTS",
    "chatterbox.mtl_tts": "ChatterboxMultilingualTTS",
    "chatterbox.tts_turbo": "ChatterboxTurboTTS",
    "chatterbox.vc": "ChatterboxVC",
}
_installed = False


def enabled() -> bool:
    return os.environ.get("CHATTERBOX_ACCEL", "").strip().lower() in TRUE


def install() -> None:
    global _installed
    if _installed or not enabled():
        return
    import wrapt

    for module_name in MODEL_CLASSES:
        wrapt.register_post_import_hook(_patch_model_module, module_name)
    _installed = True


def _options() -> dict:
    raw = os.environ.get("CHATTERBOX_ACCEL_OPTIONS", "")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"CHATTERBOX_ACCEL_OPTIONS is not valid JSON ({exc}); "
                         'example: CHATTERBOX_ACCEL_OPTIONS=\'{"compile": false}\'') from exc
    if not isinstance(options, dict):
        raise ValueError("CHATTERBOX_ACCEL_OPTIONS must be a JSON object of accelerate() options")
    return options


def _patch_model_module(module) -> None:
    import wrapt

    class_name = MODEL_CLASSES[module.__name__]

    def init_then_accelerate(wrapped, instance, args, kwargs):
        wrapped(*args, **kwargs)
        from .api import accelerate

        try:
            report = accelerate(instance, **_options())
            logger.info("CHATTERBOX_ACCEL: %s", report)
        except Exception as exc:  # the app must still get its (unaccelerated) model
            logger.warning("CHATTERBOX_ACCEL: could not accelerate %s: %s", type(instance).__name__, exc)

    wrapt.wrap_function_wrapper(module, f"{class_name}.__init__", init_then_accelerate)

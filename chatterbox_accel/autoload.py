"""`CHATTERBOX_ACCEL=1 python app.py`: accelerate every Chatterbox model the app creates.

The installed `chatterbox_accel_autoload.pth` calls `install()` at interpreter start-up, and
only when CHATTERBOX_ACCEL is set to a true value. `install()` imports nothing heavy: it
registers a post-import hook, so when (and if) the app imports `chatterbox.tts`, the
`ChatterboxTTS.__init__` of that process is wrapped to call `accelerate(self)` after the
original constructor. Options may be given as JSON in CHATTERBOX_ACCEL_OPTIONS.
"""
from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

TRUE = ("1", "true", "yes", "on")
_installed = False


def enabled() -> bool:
    return os.environ.get("CHATTERBOX_ACCEL", "").strip().lower() in TRUE


def install() -> None:
    global _installed
    if _installed or not enabled():
        return
    import wrapt

    wrapt.register_post_import_hook(_patch_tts_module, "chatterbox.tts")
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


def _patch_tts_module(module) -> None:
    import wrapt

    def init_then_accelerate(wrapped, instance, args, kwargs):
        wrapped(*args, **kwargs)
        from .api import accelerate

        try:
            report = accelerate(instance, **_options())
            logger.info("CHATTERBOX_ACCEL: %s", report)
        except Exception as exc:  # the app must still get its (unaccelerated) model
            logger.warning("CHATTERBOX_ACCEL: could not accelerate %s: %s", type(instance).__name__, exc)

    wrapt.wrap_function_wrapper(module, "ChatterboxTTS.__init__", init_then_accelerate)

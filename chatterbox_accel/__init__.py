"""chatterbox_accel: make a live Chatterbox TTS model fast, prove it still matches, undo at will.

    import chatterbox_accel
    report = chatterbox_accel.accelerate(model)   # patch + output check
    chatterbox_accel.restore(model)               # back to the original, exactly

Importing this package patches nothing and touches no global torch state.
"""
from .config import AccelConfig

__version__ = "0.1.0"
__all__ = ["accelerate", "restore", "is_accelerated", "AccelConfig", "AccelReport",
           "OutputCheckError", "OptimizedChatterboxTTS", "OptimizedChatterboxMultilingualTTS",
           "OptimizedChatterboxTurboTTS", "save_voice", "load_voice", "generate_stream", "StreamMetrics",
           "generate_batch", "reserve_batch"]


def __getattr__(name):
    # Lazy: chatterbox/torch are imported on first use, not when the package is imported.
    if name in ("accelerate", "restore", "is_accelerated", "AccelReport", "OutputCheckError"):
        from . import api
        return getattr(api, name)
    if name in ("save_voice", "load_voice"):
        from . import voice
        return getattr(voice, name)
    if name in ("generate_batch", "reserve_batch"):
        from . import engine
        return getattr(engine, name)
    if name in ("generate_stream", "StreamMetrics"):
        from . import stream
        return getattr(stream, name)
    if name.startswith("OptimizedChatterbox"):
        from . import drop_in
        if hasattr(drop_in, name):
            return getattr(drop_in, name)
    raise AttributeError(f"module 'chatterbox_accel' has no attribute {name!r}")

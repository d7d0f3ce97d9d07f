"""The engine: one owner of a model serving many concurrent streaming requests (`Engine`,
core.py), and `generate_batch()` (batch.py), which decodes on the same T3 decoder."""
from .batch import (BATCH_FAMILIES, CPU_FLOW_GROUP, DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS, BatchMetrics,
                    BatchResults, Result, RowMetrics, generate_batch, reserve_batch)
from .core import Engine
from .requests import AudioChunk, Done, EngineBusy, EngineClosed, Failed, Handle, SpeechRequest, Usage
from .split import JoinedHandle, split_text

__all__ = ["Engine", "SpeechRequest", "Handle", "AudioChunk", "Done", "Failed", "Usage", "EngineBusy",
           "EngineClosed", "JoinedHandle", "split_text", "generate_batch", "reserve_batch", "BatchResults", "BatchMetrics", "Result",
           "RowMetrics", "BATCH_FAMILIES", "CPU_FLOW_GROUP", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_NEW_TOKENS"]

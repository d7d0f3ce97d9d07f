"""The engine: `generate_batch()` (batch.py), which decodes on the runner's T3 decoder."""
from .batch import (BATCH_FAMILIES, CPU_FLOW_GROUP, DEFAULT_MAX_BATCH, DEFAULT_MAX_NEW_TOKENS, BatchMetrics,
                    BatchResults, Result, RowMetrics, generate_batch, reserve_batch)

__all__ = ["generate_batch", "reserve_batch", "BatchResults", "BatchMetrics", "Result", "RowMetrics",
           "BATCH_FAMILIES", "CPU_FLOW_GROUP", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_NEW_TOKENS"]

"""The one place that compiles or captures the T3 decode step.

`install_step(runner, ...)` picks the step implementation, most to least ambitious:
  CUDA graph of (compiled or eager) step  ->  torch.compile'd step  ->  eager step.
Each stage is tried on a real warm-up step; if it raises, the next one down is used and the
reason is returned for the report. At run time `GuardedStep` drops back to the eager step if a
compiled/captured step ever fails, so generation never dies on an optimization.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class GuardedStep:
    """Calls `fast`; on any exception logs it, switches the runner to `eager` and retries once."""

    def __init__(self, runner, fast, name: str):
        self.runner, self.fast, self.name = runner, fast, name
        self.error: str | None = None

    def __call__(self, state, params, cache, kv_len):
        try:
            return self.fast(state, params, cache, kv_len)
        except Exception as exc:  # an optimization must never kill generation
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: %s decode step failed (%s); using the eager step. "
                           "Pass compile=False, cuda_graphs=False to skip it.", self.name, self.error)
            self.runner.step = self.runner.decode_one_token
            return self.runner.decode_one_token(state, params, cache, kv_len)


class CudaGraphStep:
    """One CUDA graph per (kv_len bucket, top_p on/off), replayed over static state tensors.

    The runner reuses one `DecodeState`, one `SamplingParams` and one cache across calls, so
    their addresses are stable; a graph is recaptured only when one of them is reallocated.
    """

    def __init__(self, inner):
        self.inner = inner
        self.graphs: dict = {}
        self.pool = None

    def __call__(self, state, params, cache, kv_len):
        owners = (id(state), id(params), id(cache))
        if owners != getattr(self, "_owners", None):  # buffers reallocated: old graphs are stale
            self.graphs.clear()
            self._owners = owners
        key = (kv_len, params.use_top_p)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(state, params, cache, kv_len)
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, state, params, cache, kv_len):
        # Warm up on a side stream (allocator and autotuning settle), then restore the state
        # the warm-up advanced, then capture. Capturing runs no kernels, so the caller's
        # replay performs the real step.
        saved = {name: t.clone() for name, t in vars(state).items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.inner(state, params, cache, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        for name, t in vars(state).items():
            t.copy_(saved[name])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.inner(state, params, cache, kv_len)
        self.pool = graph.pool()
        return graph, out


def install_step(runner, *, compile_step: bool, mode: str, cuda_graphs: bool, warmup) -> dict:
    """Set `runner.step`; returns {"applied": [...], "fallbacks": {name: reason}}."""
    applied, fallbacks = [], {}
    candidates = []
    if compile_step:
        compiled = torch.compile(runner.decode_one_token, mode=mode, fullgraph=False, dynamic=False)
        if cuda_graphs and mode != "reduce-overhead":
            candidates.append(("t3.compile+cuda_graphs", CudaGraphStep(compiled)))
        candidates.append((f"t3.compile[{mode}]", compiled))
    elif cuda_graphs:
        candidates.append(("t3.cuda_graphs", CudaGraphStep(runner.decode_one_token)))
    for name, step in candidates:
        runner.step = step
        try:
            warmup()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: %s failed during warm-up, falling back: %s", name, reason)
            fallbacks[name] = reason
            continue
        runner.step = GuardedStep(runner, step, name)
        applied.append(name)
        return {"applied": applied, "fallbacks": fallbacks}
    runner.step = runner.decode_one_token
    return {"applied": applied, "fallbacks": fallbacks}

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
            report_fallback(self.runner, f"{self.name} step", self.error)
            return self.runner.decode_one_token(state, params, cache, kv_len)

    def invalidate(self) -> None:
        invalidate = getattr(self.fast, "invalidate", None)
        if invalidate is not None:
            invalidate()


def report_fallback(runner, what: str, error: str) -> None:
    """Record a run-time fallback where the model's report shows it (`runner.events`)."""
    events = getattr(runner, "events", None)
    if events is not None:
        events.append(f"{what}: {error}")


class CudaGraphStep:
    """One CUDA graph per (kv_len bucket, top_p on/off), replayed over static state tensors.

    The runner reuses one `DecodeState`, one `SamplingParams` and one cache across calls, so
    their addresses are stable. The graphs hold those objects (not their `id()`s, which a new
    allocation can reuse after the old one is freed, and a graph would then replay into freed
    memory), are dropped when a call brings other ones, and `invalidate()` drops them
    explicitly: the runner calls it whenever it reallocates its cache. `capture` (tests: a fake)
    makes (graph with .replay(), output) for one shape.
    """

    def __init__(self, inner, capture=None):
        self.inner = inner
        self.graphs: dict = {}
        self.pool = None
        self.owners: tuple | None = None  # (state, params, cache) the graphs were captured on
        self.captures = 0
        self._make = capture or self._capture

    def invalidate(self) -> None:
        self.graphs.clear()
        self.owners = None

    def __call__(self, state, params, cache, kv_len):
        owners = (state, params, cache)
        if self.owners is None or any(a is not b for a, b in zip(owners, self.owners)):
            self.invalidate()  # other buffers: graphs captured on the old ones must never replay
            self.owners = owners
        key = (kv_len, params.use_top_p)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._make(state, params, cache, kv_len)
            self.captures += 1
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
    if compile_step and mode == "reduce-overhead" and runner.backbone.device.type != "cuda":
        # Its CUDA graphs cannot exist off CUDA: say so instead of reporting them as applied.
        fallbacks["t3.compile[reduce-overhead]"] = (f"reduce-overhead's CUDA graphs need CUDA (the model is on "
                                                    f"{runner.backbone.device.type}); compiled with mode='default'")
        mode = "default"
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

"""The one place that compiles or captures the T3 decode step.

The step is the decoder's forward, `runner.step(state, cache, kv_len) -> logits (2S, V)`
(`T3Runner.slot_logits`): slot tokens and positions in, the cache written in place, no host
sync. Sampling runs after it, eagerly, per row (each row may own a generator).

`install_step(runner, ...)` picks the step implementation, most to least ambitious:
  CUDA graphs of the compiled step -> CUDA graphs of the eager step -> torch.compile'd step
  -> eager step.
Each stage is tried on real warm-up decodes; if it raises, the next one down is used and the
reason is returned for the report. At run time `GuardedStep` drops back to the eager step if a
compiled/captured step ever fails, so generation never dies on an optimization.

The step is compiled with `dynamic=None` (automatic dynamic shapes): the first call specializes,
the first call at another kv length or slot count recompiles once with those sizes symbolic, and
later sizes reuse that code. With `dynamic=False` every (slot count, kv bucket) pair would be a
compile of its own (~1 min each at full size) and past Dynamo's recompile limit (8) the step
would silently run eagerly. Our graphs wrap the compiled step, so the compiled code itself must
not capture graphs of its own: "max-autotune" is compiled as "max-autotune-no-cudagraphs" under
them, and "reduce-overhead" (its own graphs) is used without ours.
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

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (0 when the fast step captures none)."""
        return getattr(self.fast, "captures", 0)

    def __call__(self, state, cache, kv_len):
        try:
            return self.fast(state, cache, kv_len)
        except Exception as exc:  # an optimization must never kill generation
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: %s decode step failed (%s); using the eager step. "
                           "Pass compile=False, cuda_graphs=False to skip it.", self.name, self.error)
            self.runner.step = self.runner.slot_logits
            report_fallback(self.runner, f"{self.name} step", self.error)
            return self.runner.slot_logits(state, cache, kv_len)

    def invalidate(self) -> None:
        invalidate = getattr(self.fast, "invalidate", None)
        if invalidate is not None:
            invalidate()

    @property
    def can_capture(self) -> bool:
        return getattr(self.fast, "can_capture", False)

    def capture_all(self, state, cache, kv_lens) -> None:
        """The fast step's `capture_all` (none: nothing to do), guarded like a step: a failure
        switches to eager."""
        if not self.can_capture:
            return
        try:
            self.fast.capture_all(state, cache, kv_lens)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: %s capture failed (%s); using the eager step.", self.name, self.error)
            self.runner.step = self.runner.slot_logits
            report_fallback(self.runner, f"{self.name} capture", self.error)


def report_fallback(runner, what: str, error: str) -> None:
    """Record a run-time fallback where the model's report shows it (`runner.events`)."""
    events = getattr(runner, "events", None)
    if events is not None:
        events.append(f"{what}: {error}")


class CudaGraphStep:
    """One CUDA graph per (slot count, kv_len bucket), replayed over a decoder's static state.

    A runner keeps one decoder (one `SlotState`) per slot count and one cache, so their
    addresses are stable across calls. The graphs hold those objects (not their `id()`s, which
    a new allocation can reuse after the old one is freed, and a graph would then replay into
    freed memory); a call with other ones drops that slot count's graphs, and `invalidate()`
    drops them all: the runner calls it whenever it reallocates its cache. Free slots are
    padding rows: token 0 at position 0 of their own rows (neutral: nothing reads them). All
    graphs share one memory pool; `capture_all` captures a slot count's kv buckets, largest
    first, at warm-up. `capture` (tests: a fake) makes (graph with .replay(), output) for one shape.
    """

    can_capture = True

    def __init__(self, inner, capture=None):
        self.inner = inner
        self.graphs: dict = {}   # (slots, kv_len) -> (graph, logits)
        self.owners: dict = {}   # slots -> (state, cache) its graphs were captured on
        self.pool = None
        self.captures = 0
        self._make = capture or self._capture

    def invalidate(self) -> None:
        """Drop every graph and the memory pool they shared: a pool whose graphs are gone must
        not be captured into again (torch asserts on its use count, and GuardedStep would then
        switch to eager for good); the next capture starts a fresh one."""
        self.graphs.clear()
        self.owners.clear()
        self.pool = None

    def _captured_on(self, state, cache) -> bool:
        """Whether this slot count's graphs were captured on these very objects (identity)."""
        owners = self.owners.get(state.slots)
        return owners is not None and owners[0] is state and owners[1] is cache

    def __call__(self, state, cache, kv_len):
        slots = state.slots
        if not self._captured_on(state, cache):
            # other buffers: graphs captured on the old ones must never replay
            self.graphs = {k: v for k, v in self.graphs.items() if k[0] != slots}
            self.owners[slots] = (state, cache)
        key = (slots, kv_len)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._make(state, cache, kv_len)
            self.captures += 1
        graph, out = entry
        graph.replay()
        return out

    def capture_all(self, state, cache, kv_lens) -> None:
        """Capture every kv bucket of one decoder now, largest first (the pool is sized by the
        first), so no capture happens in the middle of a request. The state is left as found."""
        cache.ensure(max(kv_lens))
        saved = [t.clone() for t in (state.token, state.pos, state.speech_pos)]
        for t in (state.token, state.pos, state.speech_pos):
            t.zero_()  # padding rows: each writes position 0 of its own rows
        try:
            for kv_len in sorted(set(kv_lens), reverse=True):
                if (state.slots, kv_len) not in self.graphs or not self._captured_on(state, cache):
                    self(state, cache, kv_len)
        finally:
            for t, v in zip((state.token, state.pos, state.speech_pos), saved):
                t.copy_(v)

    def _capture(self, state, cache, kv_len):
        # Warm up on a side stream (allocator and autotuning settle), then capture. The forward
        # writes the cache at the slots' positions, the same values the replay writes; capturing
        # runs no kernels, so the caller's replay performs the real step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.inner(state, cache, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.inner(state, cache, kv_len)
        self.pool = graph.pool()
        return graph, out


def step_candidates(runner, *, compile_step: bool, mode: str, cuda_graphs: bool, fallbacks: dict,
                    graph_step=CudaGraphStep) -> list:
    """[(report name, step)], most to least ambitious (the module docstring's order); notes on
    modes that cannot do what was asked go to `fallbacks`. `graph_step` (tests: a fake-graph
    class) wraps a step in CUDA graphs."""
    candidates = []
    if compile_step and mode == "reduce-overhead" and runner.backbone.device.type != "cuda":
        # Its CUDA graphs cannot exist off CUDA: say so instead of reporting them as applied.
        fallbacks["t3.compile[reduce-overhead]"] = (f"reduce-overhead's CUDA graphs need CUDA (the model is on "
                                                    f"{runner.backbone.device.type}); compiled with mode='default'")
        mode = "default"
    if compile_step and mode == "reduce-overhead" and cuda_graphs:
        fallbacks["t3.cuda_graphs"] = ("compile_mode='reduce-overhead' captures CUDA graphs of its own; the "
                                       "project's graphs (per slot count and kv bucket, captured at warm-up) "
                                       "are not used with it")
        cuda_graphs = False
    if compile_step:
        compiled = torch.compile(runner.slot_logits, mode=mode, fullgraph=False, dynamic=None)
        if cuda_graphs:
            inner = compiled if mode == "default" else torch.compile(
                runner.slot_logits, mode="max-autotune-no-cudagraphs", fullgraph=False, dynamic=None)
            candidates.append(("t3.compile+cuda_graphs", graph_step(inner)))
    if cuda_graphs:  # the eager step captured: when the compiled one fails, graphs still pay most
        candidates.append(("t3.cuda_graphs", graph_step(runner.slot_logits)))
    if compile_step:
        candidates.append((f"t3.compile[{mode}]", compiled))
    return candidates


def install_step(runner, *, compile_step: bool, mode: str, cuda_graphs: bool, warmup,
                 graph_step=CudaGraphStep) -> dict:
    """Set `runner.step`; returns {"applied": [...], "fallbacks": {name: reason}}."""
    applied, fallbacks = [], {}
    candidates = step_candidates(runner, compile_step=compile_step, mode=mode, cuda_graphs=cuda_graphs,
                                 fallbacks=fallbacks, graph_step=graph_step)
    for name, step in candidates:
        runner.step = step
        try:
            warmup()
        except Exception as exc:
            invalidate = getattr(step, "invalidate", None)
            if invalidate is not None:  # graphs and pool of a failed candidate: never replayed
                invalidate()
            reason = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: %s failed during warm-up, falling back: %s", name, reason)
            fallbacks[name] = reason
            continue
        runner.step = GuardedStep(runner, step, name)
        applied.append(name)
        return {"applied": applied, "fallbacks": fallbacks}
    runner.step = runner.slot_logits
    return {"applied": applied, "fallbacks": fallbacks}

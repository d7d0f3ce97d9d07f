"""End-to-end `generate()` benchmark: original vs accelerated chatterbox, same model, one process.

Contract
- `bench_generate(model, text, ...)` -> `E2EResult`: per-stage medians of
  `model.generate(text, audio_prompt_path=voice)` on the original and on the accelerated path.
- One model, one set of weights. `accelerate(model, **options)` runs ONCE, with its output
  check, before anything is timed. An "original" run suspends every patch in the model's
  registry (`PatchRegistry.suspended`) for the duration of that call, so chatterbox's own
  methods run: the code `restore(model)` gives back, without throwing away the accelerated
  path's caches (which a
  restore/accelerate toggle per run would rebuild, re-compile and re-capture). The patches are
  put back in a `finally`. The model is left restored (original code) when the benchmark ends.
- Every model class of chatterbox-tts 0.1.7: English, Multilingual (pass `language_id=` as a
  generate option), Turbo, and VC (`text` is then the source audio file, `voice` the target).
- Stages, each timed by a temporary instance attribute removed in a `finally`:
  conditioning = `model.prepare_conditionals` (VC: `set_target_voice`; 0 with the built-in
  voice; with a voice cache the accelerated path hits it after warm-up, as it would in an app
  reusing one voice), t3 = `model.t3.inference` (Turbo: `inference_turbo`; VC has none),
  s3gen = `model.s3gen.inference`, watermark = `model.watermarker.apply_watermark`.
  total = wall time of `generate()`; audio = output samples / model.sr; RTF = total / audio
  (below 1: faster than real time).
- Peak memory of the process during the call, and its growth over the level before the call:
  CUDA `torch.cuda.max_memory_allocated`; CPU the resident set size sampled every 5 ms from
  /proc/self/statm (ru_maxrss, a lifetime high-water mark, is only the fallback off Linux).
  Both paths live in one process: the accelerated path's static KV cache stays allocated while
  the original runs, and after warm-up freed memory is reused, so growth is often ~0.
- Warm-up runs of both paths are not recorded; then the paths alternate run by run so machine
  noise hits both alike, and results are medians. Each run is seeded (`seed + run index`).
- Random-weight T3s never stop on their own: benchmark checkpoints written with
  `write_english_checkpoint(folder, stop_after=N)`, which stop after ~N tokens (25 = 1 s).
- Library code: never prints; `progress(message)`, if given, is called after each run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .benchmark import hardware, sync, versions

logger = logging.getLogger(__name__)

TOKENS_PER_SECOND = 25  # S3 speech tokens per second of audio
PATHS = ("original", "accelerated")
STAGE_NAMES = ("conditioning", "t3", "s3gen", "watermark")


def stages_of(model) -> tuple:
    """(stage name, attribute of the model holding the method (None: the model), method name)."""
    from .families import family, voice_method_of

    row = family(model)
    t3 = ("t3", "t3", row.t3_method) if row is not None and row.t3_method else None
    stages = (("conditioning", None, voice_method_of(model) or "prepare_conditionals"), t3,
              ("s3gen", "s3gen", "inference"), ("watermark", "watermarker", "apply_watermark"))
    return tuple(s for s in stages if s is not None)
PASSAGE = ("The quick brown fox jumps over the lazy dog while morning light spreads across the quiet "
           "valley. Somewhere far away a train whistles as it carries travellers home through fields "
           "of gold and green, and the river keeps singing its old song to anyone who will listen.")


def text_for_seconds(seconds: float) -> str:
    """English text that takes about `seconds` to speak (~2.5 words per second)."""
    words = PASSAGE.split()
    n = max(2, round(2.5 * seconds))
    text = " ".join(words[i % len(words)] for i in range(n)).rstrip(".,")
    return text[0].upper() + text[1:] + "."


def stop_after_for(seconds: float) -> int:
    """Speech tokens for `seconds` of audio: the `stop_after` of a random checkpoint."""
    return max(1, round(TOKENS_PER_SECOND * seconds))


@dataclass
class Run:
    """One timed `generate()` call."""

    stages: dict        # stage name -> seconds
    total_s: float      # wall time of generate()
    audio_s: float      # output samples / model.sr
    speech_tokens: int  # tokens T3 returned (EOS included)
    peak_mem_mb: float  # peak memory of the process during the call (see PeakMemory)
    mem_growth_mb: float = 0.0  # that peak minus the level before the call
    patched: list = field(default_factory=list)  # stages that ran accelerator-patched code

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s if self.audio_s > 0 else math.inf


@dataclass
class E2EResult:
    """Original and accelerated runs of one utterance on one model."""

    label: str                 # what the row is called, e.g. "1 s"
    text: str
    voice: str | None = None   # reference audio, None = the model's built-in voice
    target_s: float | None = None
    original: list = field(default_factory=list)     # [Run]
    accelerated: list = field(default_factory=list)  # [Run]
    warmup: int = 0            # unrecorded warm-up runs per path
    check: str = ""            # the output check of accelerate()
    applied: list = field(default_factory=list)      # optimizations accelerate() applied
    t3_fallback_calls: int = 0  # accelerated T3 calls answered by the original code

    def medians(self, path: str) -> dict:
        runs = getattr(self, path)
        out = {name: statistics.median(r.stages.get(name, 0.0) for r in runs) for name in STAGE_NAMES}
        for key in ("total_s", "audio_s", "peak_mem_mb", "mem_growth_mb", "speech_tokens"):
            out[key] = statistics.median(getattr(r, key) for r in runs)
        # From the medians it is shown beside (a median of per-run ratios is not their ratio: it
        # once printed 16.52 s for 0.88 s of audio as RTF 21.18).
        out["rtf"] = out["total_s"] / out["audio_s"] if out["audio_s"] > 0 else math.inf
        return out

    def speedup(self) -> float:
        return self.medians("original")["total_s"] / self.medians("accelerated")["total_s"]

    def summary(self) -> dict:
        rounded = {p: {k: round(float(v), 4) for k, v in self.medians(p).items()} for p in PATHS}
        patched = {p: getattr(self, p)[0].patched if getattr(self, p) else [] for p in PATHS}
        return {"label": self.label, "target_s": self.target_s, "text_chars": len(self.text),
                "voice": self.voice, "runs": len(self.original), **rounded, "patched_stages": patched,
                "speedup": round(self.speedup(), 3), "t3_fallback_calls": self.t3_fallback_calls}


@dataclass
class E2EBenchmark:
    """Several `E2EResult`s (one per utterance length) and where they were measured."""

    results: list                 # [E2EResult]
    device: str = ""
    options: dict = field(default_factory=dict)  # accelerate() options
    memory: str = ""              # how peak memory was measured
    family: str = "english"       # english, multilingual, turbo or vc
    model_class: str = "ChatterboxTTS"

    def summary(self) -> dict:

        first = self.results[0] if self.results else E2EResult("", "")
        return {"benchmark": "e2e_generate", "model": self.family, "device": self.device,
                "hardware": hardware(), **versions(), "options": self.options, "warmup": first.warmup,
                "memory": self.memory, "check": first.check, "applied": first.applied,
                "results": [r.summary() for r in self.results]}

    def table(self) -> str:

        v = versions()
        first = self.results[0] if self.results else E2EResult("", "")
        lines = [f"End-to-end {self.model_class}.generate(), {self.device}: {hardware()}",
                 f"torch {v['torch']}, transformers {v['transformers']}, chatterbox-tts {v['chatterbox-tts']}; "
                 f"accelerated: {', '.join(first.applied) or '-'}",
                 first.check or "output check not run",
                 f"median of {len(first.original)} run(s) per path after {first.warmup} warm-up; "
                 f"seconds; peak memory of the process during the call ({self.memory})",
                 ROW.format("length", "path", "cond", "T3", "S3Gen", "wmark", "total", "audio", "RTF",
                            "tokens", "peak MB", "speedup")]
        for r in self.results:
            for path in PATHS:
                m = r.medians(path)
                cells = [f"{m[k]:.2f}" for k in (*STAGE_NAMES, "total_s", "audio_s", "rtf")]
                speed = f"{r.speedup():.2f}x" if path == "accelerated" else ""
                lines.append(ROW.format(r.label if path == "original" else "", path, *cells,
                                        f"{m['speech_tokens']:.0f}", f"{m['peak_mem_mb']:.0f}", speed))
        return "\n".join(lines)


ROW = "{:>8s}  {:11s} {:>6s} {:>7s} {:>7s} {:>6s} {:>7s} {:>6s} {:>6s} {:>6s} {:>8s} {:>7s}"


# ---- the benchmark --------------------------------------------------------------------------
def bench_generate(model, text: str, *, voice=None, repeats: int = 3, warmup: int = 1, options=None,
                   seed: int = 0, label: str = "", target_s: float | None = None, progress=None,
                   **generate_kwargs) -> E2EResult:
    """Time `model.generate(text, audio_prompt_path=voice, **generate_kwargs)`, original vs
    accelerated (see the module docstring). Raises `OutputCheckError` if accelerate()'s output
    check fails: there would be no accelerated path to measure."""
    from .api import OutputCheckError, accelerate, restore

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    report = accelerate(model, **(options or {}))
    if not report.ok:
        raise OutputCheckError(f"{report.check}; the model was restored, so there is no accelerated "
                               "path to benchmark")
    result = E2EResult(label=label, text=text, voice=None if voice is None else str(voice),
                       target_s=target_s, warmup=warmup, applied=list(report.applied),
                       check=str(report.check or "output check not run"))
    try:
        for i in range(warmup + repeats):
            for path in PATHS:
                what = "warm-up" if i < warmup else f"run {i - warmup + 1}/{repeats}"
                torch.manual_seed(seed + i)
                run = run_once(model, text, voice, original=(path == "original"), **generate_kwargs)
                done = f"{label} {path} {what}: {run.total_s:.1f} s for {run.audio_s:.2f} s of audio".strip()
                logger.info("%s", done)
                if progress is not None:
                    progress(done)
                if i >= warmup:
                    getattr(result, path).append(run)
        result.t3_fallback_calls = _fallback_calls(model)
    finally:
        restore(model)
    if result.t3_fallback_calls:
        logger.warning("%d accelerated T3 call(s) fell back to the original code; see the log above",
                       result.t3_fallback_calls)
    return result


def run_once(model, text: str, voice=None, *, original: bool, **generate_kwargs) -> Run:
    """One timed `generate()`; `original=True` lifts the accelerator's patches for the call."""
    from .api import _model_device
    from .families import family

    device = _model_device(model)
    stages: dict = {name: 0.0 for name in STAGE_NAMES}
    tokens, patched = [], []
    lifted = lifted_patches(model) if original else contextlib.nullcontext()
    voice_arg = getattr(family(model), "voice_arg", "audio_prompt_path")
    with lifted, _timed_stages(model, stages, tokens, patched, device), PeakMemory(device) as memory:
        start = time.perf_counter()
        wav = model.generate(text, **{voice_arg: voice}, **generate_kwargs)
        sync(device)
        total = time.perf_counter() - start
    return Run(stages=stages, total_s=total, audio_s=wav.shape[-1] / model.sr,
               speech_tokens=sum(tokens), peak_mem_mb=memory.peak_mb, mem_growth_mb=memory.growth_mb,
               patched=patched)


@contextlib.contextmanager
def lifted_patches(model):
    """The original chatterbox code inside the block; the accelerator's patches (and their
    caches) come back on exit. Yields how many patches were lifted."""
    from .patching import get_registry

    registry = get_registry(model)
    if registry is None:
        yield 0
        return
    with registry.suspended() as count:
        yield count


@contextlib.contextmanager
def _timed_stages(model, stages: dict, tokens: list, patched: list, device):
    """Wrap each stage's method (whatever `getattr` finds now) in a timer, on the instance;
    list in `patched` the stages whose method is an accelerator patch."""
    from .patching import PatchRegistry, is_patched

    timers = PatchRegistry()  # a private registry: reverted on exit, the model's own is untouched
    try:
        for stage, part, attr in stages_of(model):
            obj = model if part is None else getattr(model, part, None)
            method = getattr(obj, attr, None)
            if method is None or not callable(method):
                continue
            if is_patched(method):
                patched.append(stage)
            timers.set_attr(obj, attr, _timer(method, stage, stages, tokens if stage == "t3" else None, device))
        yield
    finally:
        timers.revert()


def _timer(method, stage, stages, tokens, device):
    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = method(*args, **kwargs)
        sync(device)
        stages[stage] += time.perf_counter() - start
        if tokens is not None and torch.is_tensor(out):
            tokens.append(int(out.shape[-1]))
        return out

    return timed


def _fallback_calls(model) -> int:
    from .patching import get_registry

    registry = get_registry(model)
    fast = None if registry is None else registry.state.get("t3_inference")
    return 0 if fast is None else int(fast.calls.get("original", 0))


# ---- peak memory ----------------------------------------------------------------------------
STATM = Path("/proc/self/statm")


def memory_method(device) -> str:
    if torch.device(device).type == "cuda":
        return "cuda max_memory_allocated"
    return "RSS sampled every 5 ms" if STATM.exists() else "ru_maxrss, lifetime high-water mark"


class PeakMemory:
    """Context manager: `peak_mb`, the process's peak memory during the block (CUDA: allocated
    tensors; CPU: resident set), and `growth_mb`, that peak minus the level at entry."""

    def __init__(self, device, interval: float = 0.005):
        self.device, self.interval = torch.device(device), interval
        self.peak_mb = self.growth_mb = 0.0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif STATM.exists():
            self._base = self._peak = _rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self._base = _maxrss()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss())
        else:
            peak = _maxrss()
        self.peak_mb, self.growth_mb = peak / 2**20, max(0, peak - self._base) / 2**20
        return False

    def _poll(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss())


def _rss() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


# ---- chart ----------------------------------------------------------------------------------
STAGE_COLORS = {"conditioning": "#8c8c8c", "t3": "#d62728", "s3gen": "#1f77b4", "watermark": "#2ca02c"}


def write_chart(results, path) -> Path:
    """PNG: stacked stage times of original vs accelerated per utterance, and RTF beside it.
    `results`: an `E2EBenchmark` or a list of `E2EResult`. Needs matplotlib (no pyplot, no
    global backend change: the figure renders through Agg directly)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("write_chart needs matplotlib: pip install matplotlib "
                          "(or skip the chart: chatterbox-accel bench --no-chart)") from exc
    bench = results if isinstance(results, E2EBenchmark) else E2EBenchmark(list(results))
    if not bench.results:
        raise ValueError("write_chart: no results to draw")
    fig = Figure(figsize=(4 + 2.2 * len(bench.results), 4.8), layout="constrained")
    times, rtf = fig.subplots(1, 2, width_ratios=(2, 1))
    _draw_stages(times, bench.results)
    _draw_rtf(rtf, bench.results)
    fig.suptitle(f"chatterbox generate(), original vs accelerated ({bench.device or 'device ?'})")
    path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    return path


def _draw_stages(ax, results):
    width = 0.38
    for i, r in enumerate(results):
        for j, path in enumerate(PATHS):
            m, bottom, x = r.medians(path), 0.0, i + (j - 0.5) * width
            for stage in STAGE_NAMES:
                ax.bar(x, m[stage], width * 0.95, bottom=bottom, color=STAGE_COLORS[stage],
                       hatch="//" if path == "accelerated" else None, edgecolor="white",
                       label=stage if (i, j) == (0, 0) else None)
                bottom += m[stage]
            ax.text(x, bottom, f"{m['total_s']:.1f}s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(results)), [f"{r.label}: orig | accel\n{speed_words(r.speedup())}" for r in results])
    ax.set_ylabel("seconds per generate() (median)")
    ax.set_title("stage times (hatched: accelerated)")
    ax.legend(fontsize=8)


def speed_words(ratio: float) -> str:
    """'1.46x faster', '0.99x: no faster' or '1.25x slower' (original time / accelerated time)."""
    if ratio >= 1.02:
        return f"{ratio:.2f}x faster"
    if ratio > 0.98:
        return f"{ratio:.2f}x: about the same"
    return f"{1 / ratio:.2f}x slower"


def _draw_rtf(ax, results):
    width = 0.38
    for j, path in enumerate(PATHS):
        xs = [i + (j - 0.5) * width for i in range(len(results))]
        values = [r.medians(path)["rtf"] for r in results]
        ax.bar(xs, values, width * 0.95, label=path, color="#7f7f7f" if path == "original" else "#d62728")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(results)), [r.label for r in results])
    ax.set_ylabel("real-time factor (lower is faster; 1 = real time)")
    ax.set_title("RTF")
    ax.legend(fontsize=8)


__all__ = ["bench_generate", "run_once", "lifted_patches", "E2EResult", "E2EBenchmark", "Run",
           "PeakMemory", "write_chart", "text_for_seconds", "stop_after_for", "memory_method"]

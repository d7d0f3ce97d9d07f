"""Side-by-side benchmarks: original chatterbox code vs accelerated, same weights, one process.

The original is called through the class (`T3.inference(t3, ...)`), which the instance-level
patch does not touch, so both paths run on the very same module and weights, alternating
repeat by repeat so that machine noise hits both alike. Results are medians.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .t3.kernels import cpu_features

    features = " ".join(sorted(cpu_features())) or "no matrix-feature flags read"
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads; {features})"


def versions() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        cbx = version("chatterbox-tts")
    except Exception:
        cbx = "?"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "chatterbox-tts": cbx,
            "python": platform.python_version()}


@dataclass
class T3BenchResult:
    """Per path (the original, then each accelerated variant): seconds and tokens per repeat."""

    tokens: int
    seconds: dict = field(default_factory=dict)   # path -> [s per repeat]
    counts: dict = field(default_factory=dict)    # path -> [tokens per repeat]
    checks: dict = field(default_factory=dict)    # variant -> output check line
    kernels: dict = field(default_factory=dict)   # variant -> kernel selection line (CPU)
    options: dict = field(default_factory=dict)   # variant -> accelerate() options
    ran: dict = field(default_factory=dict)       # variant -> what ran (report_summary, after the timed runs)
    device: str = ""
    family: str = "english"

    def it_s(self, path: str) -> float:
        return statistics.median(t / s for t, s in zip(self.counts[path], self.seconds[path]))

    def summary(self) -> dict:
        orig = self.it_s("original")
        variants = [p for p in self.seconds if p != "original"]
        first = variants[0]
        paths = {p: {"it_s": round(self.it_s(p), 3), "speedup": round(self.it_s(p) / orig, 3),
                     "vs_" + first: round(self.it_s(p) / self.it_s(first), 3),
                     "options": self.options[p], "kernels": self.kernels.get(p, ""), "check": self.checks[p],
                     **self.ran.get(p, {})}
                 for p in variants}
        return {"benchmark": "t3_decode", "family": self.family, "tokens": self.tokens, "device": self.device,
                "original_it_s": round(orig, 3), "accelerated_it_s": paths[first]["it_s"],
                "speedup": paths[first]["speedup"], "paths": paths, "hardware": hardware(), **versions()}

    def table(self) -> str:
        s = self.summary()
        first = next(iter(s["paths"]))
        batch = "batch 1 (no CFG)" if self.family == "turbo" else "CFG batch 2"
        lines = [f"T3 decode ({self.family}), {self.tokens} tokens, {batch}, {self.device}: {s['hardware']}",
                 f"torch {s['torch']}, transformers {s['transformers']}, chatterbox-tts {s['chatterbox-tts']}",
                 f"{'path':26s} {'it/s':>8s} {'vs orig':>8s} {'vs ' + first:>16s}  check",
                 f"{'original T3.inference':26s} {s['original_it_s']:8.2f} {1.0:7.2f}x"]
        for name, p in s["paths"].items():
            lines.append(f"{name:26s} {p['it_s']:8.2f} {p['speedup']:7.2f}x {p['vs_' + first]:15.2f}x  {p['check']}")
        lines += [f"kernels ({name}): {k}" for name, k in self.kernels.items() if k]
        return "\n".join(lines)


def bench_t3(t3, *, tokens=40, repeats=3, warmup=1, options=None, variants=None) -> T3BenchResult:
    """Time the original `T3.inference` and accelerated variants on `t3` (alternating, median).

    variants: {name: accelerate() options}; default {"accelerated": options}. Each variant is
    accelerated once (its fast decoder kept), then restored, so every variant and the original
    run on the same module and weights, repeat by repeat in turn."""
    import types

    from .api import accelerate, fast_inference_of, restore
    from .check import probe_inputs

    variants = variants or {"accelerated": dict(options or {})}
    holder = types.SimpleNamespace(t3=t3, conds=None)
    turbo = getattr(t3, "is_gpt", False)
    family = "turbo" if turbo else "multilingual" if t3.hp.is_multilingual else "english"
    result = T3BenchResult(tokens=tokens, device=str(t3.device), family=family)
    t3_cond, _, _ = probe_inputs(t3, None, 1, 0.0 if turbo else 0.5)
    text = torch.randint(1, 700, (1 if turbo else 2, 42), generator=torch.Generator().manual_seed(0)).to(t3.device)
    if not turbo:
        text[:, 0], text[:, -1] = t3.hp.start_text_token, t3.hp.stop_text_token
    method, kwargs = decode_call(t3, text, tokens)
    paths = {"original": lambda: getattr(type(t3), method)(t3, t3_cond=_fresh(t3_cond), **kwargs)}
    reports = {}
    for name, opts in variants.items():
        try:
            report = accelerate(holder, **opts)
            fast = fast_inference_of(holder)
        finally:
            restore(holder)
        result.options[name], result.checks[name] = opts, str(report.check or "not run")
        result.kernels[name] = report.kernels.describe() if report.kernels is not None else ""
        if fast is None or report.restored:
            raise RuntimeError(f"variant {name!r} did not accelerate: {report}")
        paths[name] = lambda fast=fast: fast.run({"t3_cond": _fresh(t3_cond), **kwargs})
        reports[name] = (report, fast.runner)
    for i in range(warmup + repeats):
        for name, run in paths.items():
            sync(t3.device)
            start = time.perf_counter()
            out = run()
            sync(t3.device)
            if i >= warmup:
                result.seconds.setdefault(name, []).append(time.perf_counter() - start)
                result.counts.setdefault(name, []).append(out.shape[-1])
    result.ran = {name: report_summary(report, runner) for name, (report, runner) in reports.items()}
    return result


def report_summary(report, runner=None) -> dict:
    """What ran, for a benchmark's JSON line: applied, fallbacks with reasons, run-time events
    (a step that fell back to eager mid-run shows here, not as "the GPU is slow"), the CUDA
    graphs captured and the installed step. Read it after the timed runs."""
    step = getattr(runner, "step", None) if runner is not None else None
    return {"applied": list(report.applied), "fallbacks": dict(report.fallbacks),
            "runtime": list(report.runtime),  # the runner's own event list, up to date
            "captures": int(getattr(step, "captures", 0) or 0),
            "step": getattr(step, "name", None) or ("eager" if step is not None else None)}


def decode_call(t3, text, tokens: int, temperature: float = 0.8) -> tuple[str, dict]:
    """(T3 method, its keyword arguments but t3_cond) for a decode of `tokens` speech tokens of
    `text` with generate()'s other sampling defaults. Turbo: no CFG, tokens = 1 + max_gen_len."""
    if getattr(t3, "is_gpt", False):
        return "inference_turbo", dict(text_tokens=text[:1], max_gen_len=tokens - 1, temperature=temperature,
                                       top_k=1000, top_p=0.95, repetition_penalty=1.2)
    return "inference", dict(text_tokens=text, max_new_tokens=tokens, temperature=temperature, cfg_weight=0.5,
                             repetition_penalty=1.2, min_p=0.05, top_p=1.0)


def _fresh(t3_cond):
    import dataclasses

    return dataclasses.replace(t3_cond, cond_prompt_speech_emb=None)


def sync(device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def json_line(summary: dict) -> str:
    return json.dumps(summary, sort_keys=False)


def emit(summary: dict, out: str | None = "", append: bool = False) -> None:
    """A benchmark's result as one JSON line, last on stdout, and into `out` when given (a new
    file, or appended to with `append`)."""
    from pathlib import Path

    line = json_line(summary)
    print(line)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a" if append else "w") as f:
            f.write(line + "\n")


__all__ = ["bench_t3", "T3BenchResult", "hardware", "versions", "json_line", "emit", "report_summary"]

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
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


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
    tokens: int
    original_s: list = field(default_factory=list)
    accelerated_s: list = field(default_factory=list)
    original_tokens: list = field(default_factory=list)
    accelerated_tokens: list = field(default_factory=list)
    check: str = ""
    device: str = ""
    dtype: str = ""
    family: str = "english"

    def it_s(self, which: str) -> float:
        secs, toks = getattr(self, f"{which}_s"), getattr(self, f"{which}_tokens")
        return statistics.median(t / s for t, s in zip(toks, secs))

    def summary(self) -> dict:
        orig, fast = self.it_s("original"), self.it_s("accelerated")
        return {"benchmark": "t3_decode", "family": self.family, "tokens": self.tokens, "device": self.device, "dtype": self.dtype,
                "original_it_s": round(orig, 3), "accelerated_it_s": round(fast, 3),
                "speedup": round(fast / orig, 3), "hardware": hardware(), **versions(),
                "check": self.check}

    def table(self) -> str:
        s = self.summary()
        rows = [("original T3.inference", s["original_it_s"], 1.0),
                ("chatterbox_accel", s["accelerated_it_s"], s["speedup"])]
        batch = "batch 1 (no CFG)" if self.family == "turbo" else "CFG batch 2"
        lines = [f"T3 decode ({self.family}), {self.tokens} tokens, {batch}, {self.dtype}, {self.device}: "
                 f"{s['hardware']}",
                 f"torch {s['torch']}, transformers {s['transformers']}, chatterbox-tts {s['chatterbox-tts']}",
                 f"{'path':26s} {'it/s':>8s} {'speedup':>8s}"]
        lines += [f"{name:26s} {its:8.2f} {sp:7.2f}x" for name, its, sp in rows]
        return "\n".join(lines)


def bench_t3(t3, *, tokens=40, repeats=3, warmup=1, options=None) -> T3BenchResult:
    """Time the original and accelerated `T3.inference` on `t3` (alternating, median)."""
    import types

    from .api import accelerate, restore
    from .check import probe_inputs

    holder = types.SimpleNamespace(t3=t3, conds=None)
    report = accelerate(holder, **(options or {}))
    turbo = getattr(t3, "is_gpt", False)
    family = "turbo" if turbo else "multilingual" if t3.hp.is_multilingual else "english"
    result = T3BenchResult(tokens=tokens, check=str(report.check or "not run"),
                           device=str(t3.device), dtype=(options or {}).get("dtype", "float32"), family=family)
    t3_cond, _, _ = probe_inputs(t3, None, 1, 0.0 if turbo else 0.5)
    text = torch.randint(1, 700, (1 if turbo else 2, 42), generator=torch.Generator().manual_seed(0)).to(t3.device)
    if turbo:  # no CFG; generate()'s sampling defaults; tokens = 1 + max_gen_len
        kwargs = dict(text_tokens=text, max_gen_len=tokens - 1, temperature=0.8, top_k=1000, top_p=0.95,
                      repetition_penalty=1.2)
        method = "inference_turbo"
    else:
        text[:, 0], text[:, -1] = t3.hp.start_text_token, t3.hp.stop_text_token
        kwargs = dict(text_tokens=text, max_new_tokens=tokens, temperature=0.8, cfg_weight=0.5,
                      repetition_penalty=1.2, min_p=0.05, top_p=1.0)
        method = "inference"
    paths = {"original": lambda: getattr(type(t3), method)(t3, t3_cond=_fresh(t3_cond), **kwargs),
             "accelerated": lambda: getattr(t3, method)(t3_cond=_fresh(t3_cond), **kwargs)}
    try:
        for i in range(warmup + repeats):
            for name, run in paths.items():
                sync(t3.device)
                start = time.perf_counter()
                out = run()
                sync(t3.device)
                if i >= warmup:
                    getattr(result, f"{name}_s").append(time.perf_counter() - start)
                    getattr(result, f"{name}_tokens").append(out.shape[-1])
    finally:
        restore(holder)
    return result


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


__all__ = ["bench_t3", "T3BenchResult", "hardware", "versions", "json_line"]

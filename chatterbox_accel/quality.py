"""The quality report: what each output-changing mode costs in fidelity and buys in speed.

For one model, in one process, on the same weights, voice and text, each mode of `MODES` is
`accelerate()`d in turn and measured against the exact accelerated path (itself checked against
the original by its output check):
- T3 (weight formats): the output check's teacher-forced figures against float32 (total
  variation of the sampling distributions, which its gate judges, KL per step, argmax agreement,
  max relative logit error), the share of equal tokens at temperature 1e-6 over `GREEDY_TOKENS`
  steps and the step where that greedy decode first departs from exact's;
- S3Gen (fast modes): the mel of the exact path's own speech tokens, same noise seed, against
  the exact mel (relative L2, log-mel cosine);
- speed: whole `generate()` (median of the repeats after a warm-up): seconds, RTF, per stage.

Random weights cannot tell how a trained model sounds: on them these figures say how far a mode
moves the computation, not whether the audio is still good. The report runs unchanged on real
weights (the script's `--checkpoint`, or the hub), so users can measure their own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
from dataclasses import dataclass, field

import torch

GREEDY_TOKENS = 30

MODES = {
    "exact": {},
    "t3 bfloat16": {"precision": "bfloat16"},
    "t3 int8": {"precision": "int8"},
    "t3 int4": {"precision": "int4"},
    "s3gen steps=5": {"s3gen_steps": 5},
    "s3gen steps=1": {"s3gen_steps": 1},
    "s3gen cfg off": {"s3gen_cfg": False},
    "s3gen prompt<=2s": {"s3gen_prompt_seconds": 2.0},
    "s3gen bfloat16": {"s3gen_dtype": "bfloat16"},
    "preset fast": {"preset": "fast"},
}


@dataclass
class ModeResult:
    name: str
    options: dict
    applied: list = field(default_factory=list)
    fallbacks: dict = field(default_factory=dict)
    seconds: list = field(default_factory=list)   # generate() wall time per repeat
    stages: list = field(default_factory=list)    # per repeat: {stage: seconds}
    audio_s: float = 0.0
    t3_kl: float | None = None
    t3_argmax: float | None = None
    t3_rel: float | None = None
    greedy_equal: float | None = None  # share of equal tokens at temperature 1e-6 vs exact
    greedy_diverges: int | None = None  # first step where that greedy decode differs (None: never)
    t3_tv: float | None = None  # the check's mean total variation of the sampling distributions
    mel_rel_l2: float | None = None
    mel_cosine: float | None = None

    @property
    def total_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s if self.audio_s else float("inf")

    def stage(self, name: str) -> float:
        return statistics.median(s.get(name, 0.0) for s in self.stages)


@contextlib.contextmanager
def captured_s3gen_tokens(model, into: list):
    """Record the speech tokens `generate()` hands S3Gen (an instance attribute for the block)."""
    from .patching import PatchRegistry

    inner = model.s3gen.inference  # bound: the patched one when modes are installed

    def capture(*args, **kwargs):
        into.append(kwargs.get("speech_tokens", args[0] if args else None).detach().clone())
        return inner(*args, **kwargs)

    patch = PatchRegistry()
    patch.set_attr(model.s3gen, "inference", capture)
    try:
        yield
    finally:
        patch.revert()


def greedy_tokens(model) -> torch.Tensor:
    """GREEDY_TOKENS tokens of the installed fast T3 at temperature 1e-6 on the check's probe."""
    from .api import fast_inference_of
    from .benchmark import decode_call
    from .check import probe_inputs

    fast = fast_inference_of(model)
    turbo = getattr(model.t3, "is_gpt", False)
    t3_cond, text, _ = probe_inputs(model.t3, getattr(getattr(model, "conds", None), "t3", None), 1,
                                    0.0 if turbo else 0.5)
    t3_cond = dataclasses.replace(t3_cond, cond_prompt_speech_emb=None)
    _, kwargs = decode_call(model.t3, text, GREEDY_TOKENS, temperature=1e-6)
    torch.manual_seed(0)
    return fast.run({"t3_cond": t3_cond, **kwargs}).view(-1)


def measure(model, text: str, voice=None, *, modes: dict | None = None, repeats: int = 1, warmup: int = 1,
            progress=None, original: bool = True, **generate_kwargs) -> list[ModeResult]:
    """Each mode accelerated in turn on `model`; see the module docstring."""
    from .api import accelerate, restore
    from .e2e import run_once
    from .s3gen_fast import compare_mels, mel_probe

    def timed(result: ModeResult, original: bool, tokens: list | None = None) -> None:
        """warmup + repeats generate() calls into `result`; `tokens` collects what S3Gen got."""
        for i in range(warmup + repeats):
            torch.manual_seed(i)
            with captured_s3gen_tokens(model, tokens) if tokens is not None else contextlib.nullcontext():
                run = run_once(model, text, voice, original=original, **generate_kwargs)
            if i >= warmup:
                result.seconds.append(run.total_s)
                result.stages.append(run.stages)
                result.audio_s = run.audio_s
            if progress is not None:
                progress(f"{result.name}: {run.total_s:.1f} s for {run.audio_s:.2f} s of audio")

    modes = modes or MODES
    results, exact_tokens, exact_mel, exact_greedy = [], None, None, None
    if original:  # the original code, for scale: timed only
        results.append(ModeResult("original", {}))
        timed(results[-1], original=True)
    for name, options in modes.items():
        report = accelerate(model, **options)
        result = ModeResult(name, options, list(report.applied), dict(report.fallbacks))
        try:
            if not report.ok:
                result.fallbacks["check"] = str(report.check)
                results.append(result)
                continue
            check = report.check
            if check is not None:
                result.t3_kl, result.t3_argmax, result.t3_rel = check.kl_mean, check.argmax_agreement, check.rel_diff
                result.t3_tv = check.tv_mean
            tokens = []
            timed(result, original=False, tokens=tokens)
            if has_fast_t3(model):
                greedy = greedy_tokens(model)
                if exact_greedy is None:
                    exact_greedy = greedy
                n = min(len(greedy), len(exact_greedy))
                result.greedy_equal = (greedy[:n] == exact_greedy[:n]).float().mean().item() if n else 0.0
                differ = (greedy[:n] != exact_greedy[:n]).nonzero()
                result.greedy_diverges = int(differ[0, 0]) if differ.numel() else None
            if exact_tokens is None:
                exact_tokens = tokens[-1]
            mel = mel_probe(model, model.conds.gen, exact_tokens)[0]
            if exact_mel is None:
                exact_mel = mel
            result.mel_rel_l2, result.mel_cosine = compare_mels(mel, exact_mel)
        finally:
            restore(model)
        results.append(result)
    return results


def has_fast_t3(model) -> bool:
    from .api import fast_inference_of

    return fast_inference_of(model) is not None


def table(results: list[ModeResult]) -> str:
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"{'mode':18s} {'total s':>8s} {'RTF':>6s} {'x exact':>8s} {'T3 s':>6s} {'S3Gen s':>8s} "
             f"{'T3 TV':>7s} {'T3 KL':>9s} {'argmax':>7s} {'greedy=':>8s} {'diverge':>7s} {'mel relL2':>10s} {'cos':>7s}"]
    exact = next((r for r in results if r.seconds and r.name != "original"), None)
    for r in results:
        if not r.seconds:
            lines.append(f"{r.name:18s} refused: {r.fallbacks}")
            continue
        lines.append(f"{r.name:18s} {r.total_s:8.2f} {r.rtf:6.2f} {exact.total_s / r.total_s:7.2f}x "
                     f"{r.stage('t3'):6.2f} {r.stage('s3gen'):8.2f} {f(r.t3_tv, '7.3f')} {f(r.t3_kl, '9.2e')} "
                     f"{f(r.t3_argmax, '7.0%')} {f(r.greedy_equal, '8.0%')} {f(r.greedy_diverges, '7d')} "
                     f"{f(r.mel_rel_l2, '10.3f')} {f(r.mel_cosine, '7.4f')}")
        reasons = {k: v for k, v in r.fallbacks.items() if k.startswith(("t3.precision", "s3gen.modes", "check"))}
        if reasons:
            lines.append(f"{'':18s} fallbacks: {reasons}")
    return "\n".join(lines)


def summary(results: list[ModeResult]) -> dict:
    exact = next((r for r in results if r.seconds and r.name != "original"), None)
    return {r.name: {"options": r.options, "total_s": round(r.total_s, 3) if r.seconds else None,
                     "rtf": round(r.rtf, 3) if r.seconds else None,
                     "speedup_vs_exact": round(exact.total_s / r.total_s, 3) if r.seconds and exact else None,
                     "t3_s": round(r.stage("t3"), 3) if r.seconds else None,
                     "s3gen_s": round(r.stage("s3gen"), 3) if r.seconds else None,
                     "t3_tv": r.t3_tv, "t3_kl": r.t3_kl, "t3_argmax": r.t3_argmax, "t3_rel": r.t3_rel,
                     "greedy_equal": r.greedy_equal, "greedy_diverges": r.greedy_diverges, "mel_rel_l2": r.mel_rel_l2, "mel_cosine": r.mel_cosine,
                     "applied": r.applied, "fallbacks": r.fallbacks}
            for r in results}

#!/usr/bin/env python
"""Many utterances: original sequential generate(), accelerated sequential generate(), and
generate_batch(), side by side on one full-size English model (random weights), one process.

    python scripts/bench_batch.py [--family english|turbo] [--ns 1,2,4,8] [--tokens 75]
        [--voice-seconds 3] [--mixed-voices] [--repeats 1] [--skip-original] [--s3gen-kernel batch|plain|onednn|auto]
        [--checkpoint DIR]
        [--out bench/results/NAME.json]

Each utterance is ~3 s (the checkpoint's T3 stops after --tokens speech tokens; 25 = 1 s), the
voice ~3 s. For each N: N different texts run by each path, every request seeded (sequential
paths: torch.manual_seed(seed) before each generate(); generate_batch: seed=[...]). With
--repeats R the accelerated paths run R times each, alternating, and the run with the median
total is reported whole (all its columns from that one run; every run's total is in the JSON).
Stages:
T3 (aggregate speech tokens per T3 wall second), S3Gen flow, vocoder (HiFT), watermark;
end to end: audio seconds per wall second (above 1: faster than real time); peak RSS.
Every derived column is computed from the measured values beside it. T3 ratios are given
against both measurements of the accelerated single-utterance path: its N = 1 run, and the
same-N sequential run (the same path over the same N texts, measured minutes apart, so less
exposed to a shared VM's drift). A table, then one JSON line (also written to --out when given).
Turbo (`--family turbo`): its T3 stops after about --tokens speech tokens past a ~12-token text.
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from chatterbox_accel import accelerate  # noqa: E402
from chatterbox_accel.api import runner_of  # noqa: E402
from chatterbox_accel.benchmark import emit, hardware, report_summary, versions  # noqa: E402
from chatterbox_accel.checkpoints import (synthetic_voice, write_english_checkpoint,  # noqa: E402
                                          write_turbo_checkpoint)
from chatterbox_accel.families import FAMILIES  # noqa: E402
from chatterbox_accel.e2e import PeakMemory  # noqa: E402
from chatterbox_accel.engine import generate_batch, reserve_batch  # noqa: E402
from chatterbox_accel.patching import get_registry  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore today.",
    "Please call me back when you get this message.",
    "The weather is lovely this time of the year.",
    "I would like a cup of tea with milk, please.",
    "Our train leaves the station at half past nine.",
    "Turn left at the corner, then walk straight on.",
    "Thank you all for coming to the meeting today.",
    "Every morning he runs five miles along the river.",
    "The library closes early on Sundays and holidays.",
    "Can you tell me where the nearest pharmacy is?",
    "We planted tomatoes and beans in the garden.",
    "The museum opens a new exhibition next week.",
    "My grandmother bakes the best apple pie in town.",
    "Remember to save your work before you leave.",
    "The concert was sold out within an hour.",
]


class StageTimer:
    """Wall time spent in model methods (instance attributes, removed on exit)."""

    def __init__(self, model, t3_method="inference"):
        self.targets = {"t3": (model.t3, t3_method), "s3gen": (model.s3gen, "inference"),
                        "vocoder": (model.s3gen, "hift_inference"),
                        "watermark": (model.watermarker, "apply_watermark")}
        self.seconds = dict.fromkeys(self.targets, 0.0)
        self.t3_tokens = 0
        self.saved = {}

    def __enter__(self):
        for name, (obj, attr) in self.targets.items():
            inner = getattr(obj, attr)
            self.saved[name] = obj.__dict__.get(attr, _MISSING)  # an accelerate() patch lives there

            def timed(*args, _inner=inner, _name=name, **kwargs):
                t = time.perf_counter()
                out = _inner(*args, **kwargs)
                self.seconds[_name] += time.perf_counter() - t
                if _name == "t3":
                    self.t3_tokens += int(out.shape[-1])
                return out

            obj.__dict__[attr] = timed
        return self

    def __exit__(self, *exc):
        for name, (obj, attr) in self.targets.items():
            if self.saved[name] is _MISSING:
                obj.__dict__.pop(attr, None)
            else:
                obj.__dict__[attr] = self.saved[name]
        return False


_MISSING = object()


DEVICE = "cpu"
FAMILY = FAMILIES["english"]


def sequential(model, texts, voices, seeds, original: bool):
    """The paths' own generate(), one text after another. The original: every accelerate()
    patch suspended (chatterbox's own methods run), the timers wrapped inside that."""
    import contextlib

    suspend = get_registry(model).suspended() if original else contextlib.nullcontext()
    with suspend, PeakMemory(DEVICE) as mem, StageTimer(model, FAMILY.t3_method) as timer:
        start = time.perf_counter()
        audio = 0.0
        for text, voice, seed in zip(texts, voices, seeds):
            torch.manual_seed(seed)
            wav = model.generate(text, audio_prompt_path=voice)
            audio += wav.shape[-1] / model.sr
        total = time.perf_counter() - start
    s = timer.seconds
    return dict(total_s=total, audio_s=audio, t3_s=s["t3"], t3_tokens=timer.t3_tokens,
                s3gen_s=s["s3gen"] - s["vocoder"], vocoder_s=s["vocoder"], watermark_s=s["watermark"],
                peak_mb=mem.peak_mb)


def batched(model, texts, voices, seeds, max_batch):
    with PeakMemory(DEVICE) as mem:
        results = generate_batch(model, texts, audio_prompt_path=voices, seed=seeds, max_batch=max_batch)
    m = results.metrics
    return dict(total_s=m.total_seconds, audio_s=m.audio_seconds, t3_s=m.t3_seconds, t3_tokens=m.t3_tokens,
                s3gen_s=m.s3gen_seconds, vocoder_s=m.vocoder_seconds, watermark_s=m.watermark_seconds,
                peak_mb=mem.peak_mb, kv_cache_mb=m.kv_cache_bytes / 2**20, t3_steps=m.t3_steps)


def derive(row):
    row["t3_tok_s"] = row["t3_tokens"] / row["t3_s"] if row["t3_s"] else 0.0
    row["audio_per_wall"] = row["audio_s"] / row["total_s"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="english", choices=["english", "turbo"])
    ap.add_argument("--ns", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=75, help="speech tokens per utterance (75 = 3 s)")
    ap.add_argument("--voice-seconds", type=float, default=3.0)
    ap.add_argument("--mixed-voices", action="store_true", help="every other request uses a second voice")
    ap.add_argument("--max-batch", type=int, default=0, help="generate_batch's max_batch (0: N)")
    ap.add_argument("--checkpoint", default="/tmp/chatterbox-accel-bench-english")
    ap.add_argument("--out", default="")
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--s3gen-kernel", default="batch", choices=["batch", "plain", "onednn", "auto"],
                    help="accelerate()'s s3gen_kernel (default batch, as accelerate(): oneDNN products in "
                         "generate_batch's flow only; plain: F.linear everywhere; auto/onednn: in both paths)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each accelerated path per N, alternating; the median-total run is shown "
                         "(the original runs once)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on cpu, allocated on cuda)")
    args = ap.parse_args()
    global DEVICE, FAMILY
    DEVICE, FAMILY = args.device, FAMILIES[args.family]
    logging.basicConfig(level=logging.WARNING)
    import importlib

    cls = getattr(importlib.import_module(FAMILY.module), FAMILY.class_name)
    if args.family == "turbo":
        folder = write_turbo_checkpoint(args.checkpoint + "-turbo", stop_after=args.tokens + 12,
                                        voice_seconds=args.voice_seconds,
                                        prompt_tokens=min(375, int(25 * args.voice_seconds)))
    else:
        folder = write_english_checkpoint(args.checkpoint, stop_after=args.tokens, voice_seconds=args.voice_seconds)
    model = cls.from_local(folder, args.device)
    second = Path(folder) / "second_voice.wav"
    sf.write(str(second), synthetic_voice(seconds=args.voice_seconds, sr=24000, seed=7).numpy(), 24000)
    report = accelerate(model, s3gen_kernel=args.s3gen_kernel)
    ns = [int(n) for n in args.ns.split(",")]
    # Warm-up (not recorded): numba/librosa in the watermarker, the kernels, both paths; and the
    # KV cache of the largest batch reserved (allocated and touched) as a service does at start.
    warm = [TEXTS[0], TEXTS[1]]
    reserved = reserve_batch(model, args.max_batch or max(ns))
    for n in sorted(set(ns), reverse=True):  # every slot count's graphs captured before any timing
        reserve_batch(model, args.max_batch or n)
    sequential(model, warm[:1], [None], [0], original=True)
    sequential(model, warm[:1], [None], [0], original=False)
    batched(model, warm, [None, str(second) if args.mixed_voices else None], [0, 1], 2)
    if args.device != "cpu":  # a warm run per N: compiles and captures of its slot count out of the timings
        for n in ns:
            batched(model, [TEXTS[i % len(TEXTS)] for i in range(n)], [None] * n, list(range(n)), args.max_batch or n)
    rows = []
    for n in ns:
        texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        voices = [str(second) if args.mixed_voices and i % 2 else None for i in range(n)]
        seeds = list(range(100, 100 + n))
        runs = {}
        for rep in range(args.repeats):  # the paths alternate, so a drift of the VM hits each alike
            print(f"N={n} ({rep + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
            if not args.skip_original and rep == 0:
                runs.setdefault("original sequential", []).append(
                    sequential(model, texts, voices, seeds, original=True))
            runs.setdefault("accelerated sequential", []).append(
                sequential(model, texts, voices, seeds, original=False))
            runs.setdefault("generate_batch", []).append(batched(model, texts, voices, seeds, args.max_batch or n))
        for name, measured in runs.items():
            # The run with the median total, whole: every column of a row is from one run.
            row = sorted(measured, key=lambda r: r["total_s"])[len(measured) // 2]
            rows.append(derive(dict(n=n, path=name, runs=len(measured),
                                    totals_s=[round(r["total_s"], 2) for r in measured], **row)))
    header = (f"{'N':>2} {'path':<23} {'total s':>8} {'audio s':>7} {'audio/wall':>10} {'T3 s':>7} "
              f"{'T3 tok':>6} {'T3 tok/s':>8} {'S3Gen s':>7} {'HiFT s':>6} {'wm s':>5} {'peak MB':>8}")
    print(hardware())
    print(header)
    for r in rows:
        print(f"{r['n']:>2} {r['path']:<23} {r['total_s']:>8.2f} {r['audio_s']:>7.2f} {r['audio_per_wall']:>10.3f} "
              f"{r['t3_s']:>7.2f} {r['t3_tokens']:>6} {r['t3_tok_s']:>8.1f} {r['s3gen_s']:>7.2f} "
              f"{r['vocoder_s']:>6.2f} {r['watermark_s']:>5.2f} {r['peak_mb']:>8.0f}")
    by = {(r["n"], r["path"]): r for r in rows}
    single = by.get((1, "accelerated sequential"))
    ratios = {}
    for n in ns:
        b, seq, orig = by[(n, "generate_batch")], by[(n, "accelerated sequential")], by.get((n, "original sequential"))
        ratios[n] = {
            "t3_tok_s_vs_accelerated_single": b["t3_tok_s"] / single["t3_tok_s"] if single else None,
            "t3_tok_s_vs_accelerated_sequential": b["t3_tok_s"] / seq["t3_tok_s"],
            "e2e_vs_accelerated_sequential": b["audio_per_wall"] / seq["audio_per_wall"],
            "e2e_vs_original_sequential": b["audio_per_wall"] / orig["audio_per_wall"] if orig else None,
        }
        orig_ratio = ratios[n]["e2e_vs_original_sequential"]
        vs_single = ratios[n]["t3_tok_s_vs_accelerated_single"]
        print(f"N={n}: generate_batch T3 tok/s = " + (f"{vs_single:.2f}x the accelerated single utterance "
              f"(N=1 run), " if vs_single else "") + f"{ratios[n]['t3_tok_s_vs_accelerated_sequential']:.2f}x "
              f"its same-N sequential run; end to end {ratios[n]['e2e_vs_accelerated_sequential']:.2f}x "
              f"accelerated sequential" + (f", {orig_ratio:.2f}x original sequential" if orig_ratio else ""))
    summary = dict(bench="batch", family=args.family, weights="random", hardware=hardware(), versions=versions(),
                   command="python scripts/bench_batch.py " + " ".join(
                       f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
                       if v != ap.get_default(k) and k not in ("checkpoint", "out")),
                   tokens_per_utterance=args.tokens, voice_seconds=args.voice_seconds,
                   mixed_voices=args.mixed_voices, kv_cache_reserved_mb=reserved / 2**20,
                   kernels=report.kernels.describe() if report.kernels else None, attention=report.attention,
                   s3gen_kernel=report.s3gen_kernel or report.fallbacks.get("s3gen.kernel"), rows=rows, ratios=ratios,
                   ran=report_summary(report, runner_of(model)))
    emit(summary, args.out)


if __name__ == "__main__":
    main()

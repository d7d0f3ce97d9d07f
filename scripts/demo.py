#!/usr/bin/env python
"""The demo: what chatterbox-accel gives on the machine at hand, side by side with the original
on the same weights (a full-size random-weight English checkpoint; no download).

  1. one utterance: the original generate() against the accelerated one (exact float32): time,
     and whether the audio is the original's bit for bit;
  2. streaming: the accelerated stream's first audio against the original's one-shot time;
  3. batching: N utterances, the original's sequential generate() against generate_batch();
  4. reduced precision: accelerate(preset="fast") on the same model: what it applied or refused
     (with the gate's figures), and its generate() time.
A table in plain words ("faster", "slower"), a chart (./chatterbox_accel_demo.png), then ONE
JSON line. Every path runs in this one process on the same weights; the original runs with every
patch suspended. DEMO_SECONDS, DEMO_N, DEMO_VOICE_SECONDS adjust the work.

    python scripts/demo.py [--seconds 2] [--n 4] [--voice-seconds 3] [--chart PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import chatterbox_accel  # noqa: E402
from chatterbox_accel.benchmark import hardware, versions  # noqa: E402
from chatterbox_accel.e2e import speed_words, stop_after_for, text_for_seconds  # noqa: E402
from chatterbox_accel.patching import get_registry  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Please remember to bring your umbrella, it might rain later today.",
         "Our meeting has been moved to Thursday afternoon at three o'clock.",
         "She opened the old wooden box and found a letter from her grandmother."]


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def original(model, fn):
    with get_registry(model).suspended():
        return timed(fn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", 2)))
    ap.add_argument("--n", type=int, default=int(os.environ.get("DEMO_N", 4)), help="utterances in the batch")
    ap.add_argument("--voice-seconds", type=float, default=float(os.environ.get("DEMO_VOICE_SECONDS", 3)))
    ap.add_argument("--chart", default="chatterbox_accel_demo.png")
    args = ap.parse_args()

    from chatterbox_accel.cli import _load, _random_english

    stop = stop_after_for(args.seconds)
    say(f"random-weight checkpoint, full size; T3 stops after ~{stop} tokens = {args.seconds:g} s (written once)")
    folder = _random_english(stop, args.voice_seconds)
    say(f"checkpoint {folder}")
    model = _load("english", str(folder), "cpu")
    text = text_for_seconds(args.seconds)
    rows, facts = [], {}

    say("accelerate(model): exact float32, kernels measured on this CPU")
    report = chatterbox_accel.accelerate(model)
    facts["exact_applied"] = report.applied
    model.generate(text)  # warm-up of both paths (first-call costs off the table)
    original(model, lambda: model.generate(text))

    say("1/4 one utterance: original vs accelerated generate()")
    torch.manual_seed(1)
    t_orig, wav_orig = original(model, lambda: model.generate(text))
    torch.manual_seed(1)
    t_acc, wav_acc = timed(lambda: model.generate(text))
    audio_s = wav_orig.shape[-1] / model.sr
    facts["bit_for_bit"] = bool(torch.equal(wav_orig, wav_acc))
    rows.append(("generate(), one utterance", t_orig, t_acc, f"{audio_s:.1f} s of audio; "
                 f"{'the same audio bit for bit' if facts['bit_for_bit'] else 'audio differs (kernel rounding)'}"))

    say("2/4 streaming: first audio of the accelerated stream vs the original's one-shot")
    start, first = time.perf_counter(), None
    for _audio, _m in model.generate_stream(text):
        first = first if first is not None else time.perf_counter() - start
    t_stream = time.perf_counter() - start
    rows.append(("first audio: stream vs one-shot", t_orig, first,
                 f"the stream's total {t_stream:.1f} s (S3Gen re-reads the voice per chunk)"))

    texts = (TEXTS * args.n)[:args.n]
    say(f"3/4 batching: {args.n} utterances, original sequential generate() vs generate_batch()")
    t_seq, _ = original(model, lambda: [model.generate(t) for t in texts])
    t_batch, results = timed(lambda: chatterbox_accel.generate_batch(model, texts, seed=list(range(args.n))))
    batch_audio = sum(r.wav.shape[-1] for r in results) / model.sr
    rows.append((f"{args.n} utterances: sequential vs generate_batch", t_seq, t_batch,
                 f"{batch_audio:.1f} s of audio in the batch"))

    say('4/4 reduced precision: accelerate(model, preset="fast")')
    chatterbox_accel.restore(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = chatterbox_accel.accelerate(model, preset="fast")
    model.generate(text)  # warm-up
    torch.manual_seed(1)
    t_fast, _ = timed(lambda: model.generate(text))
    refused = {k: str(v)[:160] for k, v in (fast.fallbacks or {}).items()}
    facts["fast_applied"], facts["fast_refused"] = fast.applied, refused
    note = ("int8 T3 ran" if any("int8" in a for a in fast.applied) else "T3 ran exact (reduced precision refused: "
            "see below)") + "; S3Gen fast modes " + ("on" if any("s3gen.modes" in a or "s3gen.steps" in a
                                                               for a in fast.applied) else "refused")
    rows.append(('generate(), preset="fast" (changes the output)', t_orig, t_fast, note))
    chatterbox_accel.restore(model)

    print(f"chatterbox-accel demo on {hardware()}, torch {torch.__version__}, full-size English, random weights")
    print(f"{'what':50s} {'original':>9s} {'accel':>9s}  result")
    for what, a, b, note in rows:
        print(f"{what:50s} {a:8.1f}s {b:8.1f}s  {speed_words(a / b)}; {note}")
    if refused:
        print("what preset='fast' did not apply, and why:")
        for k, v in refused.items():
            print(f"  {k}: {v}")
    _chart(rows, Path(args.chart), hardware())
    print(json.dumps({"bench": "demo", "hardware": hardware(), "versions": versions(), "seconds": args.seconds,
                      "n": args.n, "voice_seconds": args.voice_seconds,
                      "rows": [{"what": w, "original_s": round(a, 2), "accelerated_s": round(b, 2),
                                "ratio": round(a / b, 3), "note": n} for w, a, b, n in rows], **facts}))
    return 0


def _chart(rows, path: Path, machine: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no chart")
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r[1] for r in rows], 0.4, label="original", color="#999999")
    ax.barh([i - 0.2 for i in y], [r[2] for r in rows], 0.4, label="chatterbox-accel", color="#2a7ab9")
    ax.set_yticks(list(y), [f"{r[0]}\n{speed_words(r[1] / r[2])}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (lower is better)")
    ax.set_title(f"chatterbox-accel vs the original, same weights ({machine})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    say(f"chart written to {path.resolve()}")


if __name__ == "__main__":
    sys.exit(main())

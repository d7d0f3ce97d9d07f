#!/usr/bin/env python
"""Quality report: every output-changing mode against the exact path, with its speed.

One model, one process, the same weights, voice and text for every mode (chatterbox_accel/quality.py):
T3 weight formats by KL / argmax agreement against float32 and equal tokens at temperature 1e-6;
S3Gen fast modes by the mel of the exact path's tokens (relative L2, log-mel cosine); whole
`generate()` time and RTF per mode. A table, then one JSON line.

Random weights (the default: a random checkpoint in the official layout is written, as
`chatterbox-accel bench` does) cannot tell how a trained model sounds; run it on real weights
with --checkpoint DIR (a folder in the official layout) or --hub to measure your own.

    python scripts/bench_quality.py [--model english|turbo|multilingual] [--seconds 3]
        [--voice-seconds 3] [--repeats 1] [--modes "exact,t3 int8,preset fast"]
        [--checkpoint DIR | --hub | --realistic ENTROPY]

--realistic ENTROPY (English): the random checkpoint's T3 made to behave like a trained one
where precision can tell (chatterbox_accel/realistic.py: peaked logits of that mean entropy in
nats, outlier channels): what the reduced-precision gate is judged on.
"""
import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from chatterbox_accel import quality  # noqa: E402
from chatterbox_accel.benchmark import hardware, versions  # noqa: E402
from chatterbox_accel.cli import _bench_plan, _load  # noqa: E402
from chatterbox_accel.e2e import text_for_seconds  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("english", "multilingual", "turbo"), default="english")
    ap.add_argument("--seconds", type=float, default=3.0, help="utterance length (random weights: tokens decoded)")
    ap.add_argument("--voice-seconds", type=float, default=3.0, help="synthetic reference voice length")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", default=",".join(quality.MODES), help="comma-separated names from quality.MODES")
    ap.add_argument("--no-original", action="store_true", help="skip timing the original code")
    ap.add_argument("--mode", action="append", default=[], metavar="NAME=JSON",
                    help='an extra mode: accelerate() options as JSON, e.g. \'fastest={"preset": "fast", "s3gen_steps": 1}\'')
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="a local checkpoint in the official layout (real weights)")
    src.add_argument("--hub", action="store_true", help="the official weights from the Hugging Face hub")
    src.add_argument("--realistic", type=float, metavar="ENTROPY",
                     help="English: a random checkpoint with peaked logits (mean entropy, nats) and outlier channels")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    modes = {}
    for name in args.modes.split(","):
        if name not in quality.MODES:
            sys.exit(f"unknown mode {name!r}; choose from {list(quality.MODES)}")
        modes[name] = quality.MODES[name]
    for spec in args.mode:
        name, _, options = spec.partition("=")
        try:
            modes[name] = json.loads(options)
        except json.JSONDecodeError as exc:
            sys.exit(f"--mode {spec!r}: the options must be a JSON object ({exc})")
    import soundfile as sf
    import torch

    from chatterbox_accel.checkpoints import synthetic_voice

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        voice = Path(tmp) / "voice.wav"
        sf.write(voice, synthetic_voice(args.voice_seconds, seed=5).numpy(), 24000)
        if args.hub:
            folder = None
        elif args.checkpoint:
            folder = args.checkpoint
        elif args.realistic is not None:
            if args.model != "english":
                sys.exit("--realistic is for --model english")
            from chatterbox_accel.checkpoints import write_english_checkpoint
            from chatterbox_accel.cli import _cache_dir
            from chatterbox_accel.e2e import stop_after_for

            stop = stop_after_for(args.seconds)
            folder = str(write_english_checkpoint(_cache_dir() / f"english-stop{stop}-realistic{args.realistic:g}",
                                                  stop_after=stop, realistic=args.realistic))
        else:
            folder = str(_bench_plan(None, [args.seconds], args.model, voice)[0][0])
        model = _load(args.model, folder, device)
        extra = {"language_id": "en"} if args.model == "multilingual" else {}
        with contextlib.redirect_stdout(sys.stderr):  # chatterbox's own prints: stdout holds results only
            results = quality.measure(model, text_for_seconds(args.seconds), str(voice), modes=modes,
                                      repeats=args.repeats, warmup=args.warmup, original=not args.no_original,
                                      progress=lambda m: print(m, file=sys.stderr), **extra)
    print(f"Quality and speed per mode, {args.model}, ~{args.seconds:g} s utterance, {args.voice_seconds:g} s voice, "
          f"{'random' if not (args.hub or args.checkpoint) else 'given'} weights, {device}: {hardware()}")
    print(quality.table(results))
    print(json.dumps({"benchmark": "quality", "model": args.model, "seconds": args.seconds,
                      "voice_seconds": args.voice_seconds, "random_weights": not (args.hub or args.checkpoint),
                      "realistic_entropy": args.realistic,
                      "modes": quality.summary(results), "hardware": hardware(), **versions()}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Streaming vs one-shot, one model, one process: time to first chunk, total time, RTF.

Full-size random-weight checkpoint whose T3 stops after --seconds of speech tokens, with a
--voice-seconds built-in voice (S3Gen re-reads that prompt on every pass, so it sets the floor
of each chunk's cost). Same seed for every run, so every run decodes the same tokens.
Rows: the original generate() (chatterbox's own code, patches suspended), the accelerated
generate(), and the accelerated generate_stream(). Prints a table, then one JSON line.

    python scripts/bench_stream.py --seconds 5 --voice-seconds 10 [--model multilingual|turbo]
"""
import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import chatterbox_accel  # noqa: E402
from chatterbox_accel.benchmark import hardware, sync, versions  # noqa: E402
from chatterbox_accel.e2e import stop_after_for, text_for_seconds  # noqa: E402
from chatterbox_accel.patching import get_registry  # noqa: E402


def one_shot(model, text, device, seed, **kwargs):
    torch.manual_seed(seed)
    start = time.perf_counter()
    wav = model.generate(text, **kwargs)
    sync(device)
    return time.perf_counter() - start, wav.shape[-1] / model.sr


def streamed(model, text, device, seed, chunk, first, **kwargs):
    torch.manual_seed(seed)
    start, first_at, samples, chunks = time.perf_counter(), None, 0, 0
    for audio, metrics in model.generate_stream(text, chunk_size=chunk, first_chunk_size=first, **kwargs):
        sync(device)
        first_at = first_at if first_at is not None else time.perf_counter() - start
        samples, chunks = metrics.samples_so_far, chunks + 1
    return first_at, time.perf_counter() - start, samples / model.sr, chunks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="utterance length")
    ap.add_argument("--voice-seconds", type=float, default=10.0, help="built-in voice length")
    ap.add_argument("--chunk", type=int, default=25, help="chunk_size, speech tokens")
    ap.add_argument("--first-chunk", type=int, default=12, help="first_chunk_size, speech tokens")
    ap.add_argument("--model", choices=("english", "multilingual", "turbo"), default="english")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--no-original", action="store_true", help="skip the original generate() row")
    args = ap.parse_args()
    from chatterbox_accel.cli import _load, _turbo_text_tokens, _writer

    name = "" if args.model == "english" else f"{args.model}-"
    folder = args.checkpoint or os.path.join(
        tempfile.gettempdir(), f"chatterbox-accel-{name}{args.seconds:g}s-voice{args.voice_seconds:g}")
    stop = stop_after_for(args.seconds)
    if args.model == "turbo":  # its stop position counts the text tokens too (see checkpoints.py)
        stop += _turbo_text_tokens(args.seconds)
    _writer(args.model)(folder, stop_after=stop, voice_seconds=args.voice_seconds)
    model = _load(args.model, folder, args.device)
    report = chatterbox_accel.accelerate(model)
    text = text_for_seconds(args.seconds)
    kwargs = {"language_id": "en"} if args.model == "multilingual" else {}
    streamed(model, text, args.device, 0, args.chunk, args.first_chunk, **kwargs)  # warm-up, not recorded
    rows = {}
    if not args.no_original:
        with get_registry(model).suspended():
            rows["original generate()"] = one_shot(model, text, args.device, 1, **kwargs)
    rows["accelerated generate()"] = one_shot(model, text, args.device, 1, **kwargs)
    first, total, audio_s, chunks = streamed(model, text, args.device, 1, args.chunk, args.first_chunk, **kwargs)
    print(f"{type(model).__name__}, {args.seconds:g} s utterance, {args.voice_seconds:g} s voice, "
          f"{args.device}: {hardware()}")
    print(f"{'path':26s} {'first audio':>12s} {'total':>9s} {'audio':>7s} {'RTF':>6s}")
    for name, (secs, audio) in rows.items():
        print(f"{name:26s} {secs:11.2f}s {secs:8.2f}s {audio:6.2f}s {secs / audio:6.2f}")
    print(f"{'accelerated stream':26s} {first:11.2f}s {total:8.2f}s {audio_s:6.2f}s {total / audio_s:6.2f}"
          f"   ({chunks} chunks, first {args.first_chunk} then {args.chunk} tokens)")
    base = rows["accelerated generate()"][0]
    print(f"first chunk after {first / base:.2f} of the accelerated one-shot time")
    print(json.dumps({
        "benchmark": "stream", "model": args.model, "seconds": args.seconds, "voice_seconds": args.voice_seconds,
        "first_chunk_s": round(first, 3), "stream_total_s": round(total, 3), "chunks": chunks,
        "one_shot_s": {k: round(v[0], 3) for k, v in rows.items()}, "audio_s": round(audio_s, 3),
        "first_chunk_fraction": round(first / base, 3), "chunk_size": args.chunk,
        "first_chunk_size": args.first_chunk, "check_passed": report.ok,
        "hardware": hardware(), **versions()}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Voice-conditioning cost: original prepare_conditionals vs a chatterbox_accel cache hit.

Full-size random-weight checkpoint, a 10 s synthetic reference voice; the original is timed
warm (after librosa's first-call compilation), median of --repeats; prints a table, then JSON.

    python scripts/bench_voice.py --checkpoint DIR
"""
import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import soundfile as sf  # noqa: E402

import chatterbox_accel  # noqa: E402
from chatterbox_accel.benchmark import hardware, versions  # noqa: E402
from chatterbox_accel.checkpoints import synthetic_voice, write_english_checkpoint  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "chatterbox-accel-english"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from chatterbox.tts import ChatterboxTTS

    model = ChatterboxTTS.from_local(write_english_checkpoint(args.checkpoint), "cpu")
    ref = os.path.join(tempfile.mkdtemp(), "ref.wav")
    sf.write(ref, synthetic_voice(10.0, seed=3).numpy(), 24000)
    model.prepare_conditionals(ref)  # warm-up: librosa/numba compile on first use
    original = timed(lambda: model.prepare_conditionals(ref), args.repeats)
    chatterbox_accel.accelerate(model, check=False)
    model.prepare_conditionals(ref)  # the one miss
    cached = timed(lambda: model.prepare_conditionals(ref), args.repeats)
    print(f"prepare_conditionals, 10 s reference, cpu: {hardware()}")
    print(f"{'original (warm)':22s} {original * 1e3:9.1f} ms")
    print(f"{'chatterbox_accel hit':22s} {cached * 1e3:9.1f} ms   {original / cached:.0f}x less")
    print(json.dumps({"benchmark": "prepare_conditionals", "original_ms": round(original * 1e3, 1),
                      "cached_ms": round(cached * 1e3, 2), "ratio": round(original / cached, 1),
                      "hardware": hardware(), **versions()}))


if __name__ == "__main__":
    main()

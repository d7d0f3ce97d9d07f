#!/usr/bin/env python
"""The engine under concurrent streams, beside sequential generate_stream() and generate(), one
model, one process (full-size English on random weights: a random model's compute is a trained
one's).

    python scripts/bench_engine.py [--ns 1,2,4,8] [--seconds 3] [--voice-seconds 3] [--mixed-voices]
        [--stagger 0] [--paragraph-seconds 15] [--out bench/results/NAME.json]

Part 1, ~--seconds utterances (the checkpoint's T3 stops after that many seconds of tokens):
for each N, N requests (different texts, seeded) submitted to one `Engine` together (or
--stagger seconds apart), each read to its end; per level: time to first chunk p50/p95, total
latency p50/p95, aggregate audio seconds per wall second, T3 speech tokens per wall second, the
share of the engine's time in S3Gen (its streamer's passes: flow, vocoder, watermark). Beside it,
in the same run on the same weights: the same max(N) texts through sequential accelerated
`generate_stream()` and sequential accelerated `generate()`.
Part 2 (--paragraph-seconds > 0): a second checkpoint whose T3 stops after that many seconds; one
request through the engine (growing chunks), `generate_stream()` and one-shot `generate()`: how
much a stream's re-running of S3Gen costs in total against one pass.
Floors (issue 23) are checked and printed: at the largest N, aggregate audio s/s >= 1.4x
sequential generate_stream(); p95 first chunk <= 3x the N = 1 figure; the N = 1 first chunk no
slower than generate_stream()'s; the long stream's total <= 1.3x one-shot. A table, then ONE
JSON line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("TQDM_DISABLE", "1")

from bench_batch import TEXTS  # noqa: E402  (the same 16 sentences as the batch benchmarks)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def engine_level(engine, n, voices, stagger, seed0):
    from chatterbox_accel.engine import SpeechRequest

    before = dict(engine.s3gen_stats)
    results, threads = [None] * n, []

    def read(i, handle):
        audio, usage = handle.result()
        results[i] = usage

    start = time.perf_counter()
    for i in range(n):
        if i and stagger:
            time.sleep(stagger)
        handle = engine.submit(SpeechRequest(TEXTS[i % len(TEXTS)], voice=voices[i % len(voices)], seed=seed0 + i))
        thread = threading.Thread(target=read, args=(i, handle))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    s3gen = {k: engine.s3gen_stats[k] - before[k] for k in before}
    first = [u.time_to_first_chunk for u in results]
    total = [u.total_seconds for u in results]
    audio = sum(u.audio_seconds for u in results)
    tokens = sum(u.speech_tokens for u in results)
    return {"n": n, "wall_s": round(wall, 2), "first_chunk_p50_s": round(statistics.median(first), 3),
            "first_chunk_p95_s": round(pct(first, 0.95), 3), "latency_p50_s": round(statistics.median(total), 2),
            "latency_p95_s": round(pct(total, 0.95), 2), "audio_s": round(audio, 2),
            "audio_s_per_wall_s": round(audio / wall, 4), "t3_tokens_per_s": round(tokens / wall, 2),
            "s3gen_share": round(s3gen["seconds"] / wall, 3),
            "flow_rows_per_call": round(s3gen["flow_rows"] / max(1, s3gen["flow_calls"]), 2)}


def sequential_stream(model, texts, seed0, voice_path=None):
    import torch

    firsts, totals, audio = [], [], 0.0
    start_all = time.perf_counter()
    for i, text in enumerate(texts):
        torch.manual_seed(seed0 + i)
        start, first = time.perf_counter(), None
        kwargs = {"audio_prompt_path": voice_path} if voice_path else {}
        samples = 0
        for chunk, metrics in model.generate_stream(text, **kwargs):
            if first is None:
                first = time.perf_counter() - start
            samples = metrics.samples_so_far
        firsts.append(first)
        totals.append(time.perf_counter() - start)
        audio += samples / model.sr
    wall = time.perf_counter() - start_all
    return {"n": len(texts), "wall_s": round(wall, 2), "first_chunk_p50_s": round(statistics.median(firsts), 3),
            "latency_p50_s": round(statistics.median(totals), 2), "audio_s": round(audio, 2),
            "audio_s_per_wall_s": round(audio / wall, 4)}


def sequential_generate(model, texts, seed0):
    import torch

    totals, audio = [], 0.0
    start_all = time.perf_counter()
    for i, text in enumerate(texts):
        torch.manual_seed(seed0 + i)
        start = time.perf_counter()
        wav = model.generate(text)
        totals.append(time.perf_counter() - start)
        audio += wav.shape[-1] / model.sr
    wall = time.perf_counter() - start_all
    return {"n": len(texts), "wall_s": round(wall, 2), "latency_p50_s": round(statistics.median(totals), 2),
            "audio_s": round(audio, 2), "audio_s_per_wall_s": round(audio / wall, 4)}


def load(folder):
    import chatterbox_accel
    from chatterbox.tts import ChatterboxTTS

    model = ChatterboxTTS.from_local(str(folder), "cpu")
    report = chatterbox_accel.accelerate(model)
    return model, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--voice-seconds", type=float, default=3.0)
    ap.add_argument("--mixed-voices", action="store_true", help="alternate the built-in voice and two references")
    ap.add_argument("--stagger", type=float, default=0.0, help="seconds between arrivals (0: together)")
    ap.add_argument("--paragraph-seconds", type=float, default=15.0, help="part 2's utterance (0: skip part 2)")
    ap.add_argument("--out", help="also append the JSON line to this file")
    args = ap.parse_args()
    ns = [int(n) for n in args.ns.split(",")]

    import tempfile

    import soundfile as sf
    import torch

    from chatterbox_accel.benchmark import emit, hardware, versions
    from chatterbox_accel.checkpoints import synthetic_voice
    from chatterbox_accel.cli import _random_english
    from chatterbox_accel.e2e import stop_after_for
    from chatterbox_accel.engine import Engine, SpeechRequest

    stop = stop_after_for(args.seconds)
    model, report = load(_random_english(stop, args.voice_seconds))
    print(f"accelerated: {', '.join(report.applied)}", file=sys.stderr)
    voices, work = [None], tempfile.mkdtemp(prefix="bench-engine-")
    engine = Engine(model, max_batch=max(ns), max_queue=max(ns))
    if args.mixed_voices:
        for k in (1, 2):
            path = os.path.join(work, f"v{k}.wav")
            sf.write(path, synthetic_voice(args.voice_seconds, seed=10 + k).numpy(), 24000)
            engine.voices.add(f"v{k}", path)
            voices.append(f"v{k}")
    try:
        engine.submit(SpeechRequest(TEXTS[0], seed=999)).result()  # warm-up: first-call costs off the table
        rows = []
        for n in ns:
            rows.append(engine_level(engine, n, voices, args.stagger, seed0=100 * n))
            print(rows[-1], file=sys.stderr)
    finally:
        engine.close()
    texts = [TEXTS[i % len(TEXTS)] for i in range(max(ns))]
    stream = sequential_stream(model, texts, seed0=100 * max(ns))
    print({"generate_stream": stream}, file=sys.stderr)
    oneshot = sequential_generate(model, texts, seed0=100 * max(ns))
    print({"generate": oneshot}, file=sys.stderr)
    del engine, model
    long = None
    if args.paragraph_seconds > 0:
        model, _ = load(_random_english(stop_after_for(args.paragraph_seconds), args.voice_seconds))
        text = TEXTS[1]  # one piece: the checkpoint, not the text, sets the length
        engine = Engine(model, max_batch=1, max_queue=1)
        try:
            engine.submit(SpeechRequest(TEXTS[0], seed=999, max_new_tokens=30)).result()  # warm-up
            _, usage = engine.submit(SpeechRequest(text, seed=5)).result()
        finally:
            engine.close()
        torch.manual_seed(5)
        g = sequential_generate(model, [text], seed0=5)
        s = sequential_stream(model, [text], seed0=5)
        long = {"audio_s": round(usage.audio_seconds, 2), "engine_total_s": round(usage.total_seconds, 2),
                "engine_first_chunk_s": round(usage.time_to_first_chunk, 3), "generate_stream_total_s": s["wall_s"],
                "generate_stream_first_chunk_s": s["first_chunk_p50_s"], "generate_total_s": g["wall_s"],
                "engine_vs_generate": round(usage.total_seconds / g["wall_s"], 3)}
        print({"paragraph": long}, file=sys.stderr)

    top = rows[-1]
    one = next((r for r in rows if r["n"] == 1), None)
    floors = {
        f"audio_s_per_s_at_{top['n']}_vs_sequential_stream >= 1.4":
            round(top["audio_s_per_wall_s"] / stream["audio_s_per_wall_s"], 3),
        f"first_chunk_p95_at_{top['n']}_vs_1 <= 3": round(top["first_chunk_p95_s"] / one["first_chunk_p50_s"], 3)
        if one else None,
        "first_chunk_at_1_vs_generate_stream <= 1.0": round(one["first_chunk_p50_s"] / stream["first_chunk_p50_s"], 3)
        if one else None,
    }
    if long:
        floors[f"stream_total_vs_one_shot_{args.paragraph_seconds:g}s <= 1.3"] = long["engine_vs_generate"]
    print(f"{'N':>3} {'first p50':>10} {'first p95':>10} {'lat p50':>8} {'lat p95':>8} {'audio s/s':>10} "
          f"{'T3 tok/s':>9} {'S3Gen':>6}")
    for r in rows:
        print(f"{r['n']:>3} {r['first_chunk_p50_s']:>9.2f}s {r['first_chunk_p95_s']:>9.2f}s {r['latency_p50_s']:>7.1f}s "
              f"{r['latency_p95_s']:>7.1f}s {r['audio_s_per_wall_s']:>10.4f} {r['t3_tokens_per_s']:>9.1f} "
              f"{r['s3gen_share']:>6.0%}")
    print(f"sequential generate_stream() x{stream['n']}: first chunk p50 {stream['first_chunk_p50_s']:.2f} s, "
          f"audio s/s {stream['audio_s_per_wall_s']:.4f}; sequential generate() x{oneshot['n']}: audio s/s "
          f"{oneshot['audio_s_per_wall_s']:.4f}")
    for name, value in floors.items():
        limit = float(name.rsplit(" ", 1)[1])
        ok = value is not None and (value >= limit if ">=" in name else value <= limit)
        print(f"floor {name}: {value} {'met' if ok else 'MISSED'}")
    emit({"bench": "engine", "hardware": hardware(), "versions": versions(), "model": "english",
          "t3": "full size, random weights", "checkpoint_stop_after": stop, "voice_seconds": args.voice_seconds,
          "mixed_voices": args.mixed_voices, "stagger_s": args.stagger, "accelerated": report.applied,
          "levels": rows, "sequential_generate_stream": stream, "sequential_generate": oneshot, "paragraph": long,
          "floors": floors, "date": time.strftime("%Y-%m-%d")}, args.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

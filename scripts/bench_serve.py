#!/usr/bin/env python
"""Load test of the speech server with the real `openai` client: closed loop at each concurrency.

Starts `chatterbox-accel serve` on 127.0.0.1 on a random-weight English checkpoint (full size by
default: a random model's compute is the real one's), then for each concurrency C runs C workers
that send requests back to back (`AsyncOpenAI(max_retries=0)`, `with_streaming_response`, raw
PCM so audio seconds are exact) until --requests have finished. Patterns: `sentence` (Open
WebUI: one sentence per request, ~--seconds of audio each) and `paragraph` (a ~3-piece text the
engine splits). Per level: requests/s, latency and time to first audio byte (p50/p95),
aggregate audio seconds per wall second, the worst underrun (how far a real-time player started
at the first byte would fall behind), errors by status. A table, then ONE JSON line.

    python scripts/bench_serve.py [--concurrency 1,2,4,8] [--requests 8] [--patterns sentence,paragraph]
                                  [--seconds 3] [--checkpoint DIR] [--tiny] [--max-batch 8]
                                  [--ray N [--cpus-per-replica C] [--gpus-per-replica G]]

--ray N targets `chatterbox-accel serve --ray --replicas N` (Ray Serve's proxy in front of N
replicas, each its own engine) with the same loop.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "Please remember to bring your umbrella, it might rain later today.",
             "Our meeting has been moved to Thursday afternoon at three o'clock.",
             "She opened the old wooden box and found a letter from her grandmother."]
PARAGRAPH = ("Welcome back to the show. Today we are talking about the history of the printing press, "
             "and how it changed the way ideas travelled across Europe. Before it, every book was copied "
             "by hand, which took months of careful work. Afterwards, a single workshop could produce "
             "hundreds of copies in the same time. Scholars, merchants and reformers were quick to see "
             "what this meant, and within fifty years presses were running in more than two hundred cities.")
SAMPLE_RATE = 24000


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


async def one_request(client, text: str, seed: int) -> dict:
    import openai

    start = time.perf_counter()
    first, audio_bytes, lateness = None, 0, 0.0
    try:
        async with client.audio.speech.with_streaming_response.create(
                model="chatterbox", input=text, voice="alloy", response_format="pcm",
                extra_body={"seed": seed}) as response:
            async for data in response.iter_bytes():
                now = time.perf_counter() - start
                if first is None:
                    first = now
                else:  # a player started at the first byte needs these samples at first + played
                    lateness = max(lateness, now - (first + audio_bytes / 2 / SAMPLE_RATE))
                audio_bytes += len(data)
        status = 200
    except openai.APIStatusError as exc:
        status = exc.status_code
    except (openai.APIConnectionError, openai.APITimeoutError):
        status = 0
    return {"status": status, "latency": time.perf_counter() - start, "first": first,
            "audio": audio_bytes / 2 / SAMPLE_RATE, "underrun": lateness}


async def level(url: str, concurrency: int, total: int, texts: list[str]) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    results, issued = [], 0

    async def worker():
        nonlocal issued
        while issued < total:
            i = issued
            issued += 1
            results.append(await one_request(client, texts[i % len(texts)], seed=i))

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if r["status"] == 200]
    errors: dict = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    lat, first = [r["latency"] for r in ok], [r["first"] for r in ok if r["first"] is not None]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 3),
            "latency_p50_s": _r(percentile(lat, 0.5)), "latency_p95_s": _r(percentile(lat, 0.95)),
            "first_audio_p50_s": _r(percentile(first, 0.5)), "first_audio_p95_s": _r(percentile(first, 0.95)),
            "audio_s": round(sum(r["audio"] for r in ok), 2),
            "audio_s_per_wall_s": round(sum(r["audio"] for r in ok) / wall, 3),
            "underrun_max_s": _r(max((r["underrun"] for r in ok), default=None)), "errors": errors}


def _r(x):
    return None if x is None else round(x, 3)


def engine_first_chunk(folder: Path, tiny: bool, options: list, repeats: int = 3):
    """Median first-chunk time of the sentence pattern's first text through an Engine in this
    process (no HTTP), after the server has stopped: the floor the server's first byte is held to."""
    import torch

    import chatterbox_accel
    from chatterbox_accel.cli import _load, _option
    from chatterbox_accel.engine import AudioChunk, Engine, SpeechRequest

    print("the engine in process, for its first chunk ...", file=sys.stderr)
    if tiny:
        from chatterbox_accel.checkpoints import tiny_english_model

        model = tiny_english_model(folder)
    else:
        model = _load("english", str(folder), "cpu")
    chatterbox_accel.accelerate(model, **dict(_option(o) for o in options))
    times = []
    with Engine(model, max_batch=8) as engine:
        for i in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            for event in engine.submit(SpeechRequest(SENTENCES[0], seed=i)):
                if isinstance(event, AudioChunk):
                    times.append(time.perf_counter() - start)
                    break
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return round(statistics.median(times[1:]), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,2,4,8", help="levels, e.g. 1,2,4,8 (16,32 on a GPU)")
    ap.add_argument("--requests", type=int, default=8, help="requests per level (at least the concurrency)")
    ap.add_argument("--patterns", default="sentence,paragraph")
    ap.add_argument("--seconds", type=float, default=3.0, help="audio per sentence (sets the checkpoint's stop)")
    ap.add_argument("--voice-seconds", type=float, default=3.0,
                    help="the built-in voice's length (S3Gen re-reads it for every chunk; chatterbox's is 10 s)")
    ap.add_argument("--checkpoint", help="a checkpoint folder (default: a random-weight one, written once)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer T3 (a smoke run, not a measurement)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--option", action="append", default=[], help="accelerate() option for the server, KEY=VALUE")
    ap.add_argument("--ray", type=int, metavar="N", help="drive `serve --ray --replicas N` (Ray Serve) instead of "
                    "the single-process server")
    ap.add_argument("--cpus-per-replica", type=float, help="with --ray: CPUs (torch threads) per replica "
                    "(default: this machine's cores / N)")
    ap.add_argument("--gpus-per-replica", type=float, help="with --ray: GPUs per replica")
    ap.add_argument("--out", help="also append the JSON line to this file")
    ap.add_argument("--no-engine-baseline", action="store_true",
                    help="skip the in-process Engine run (its first chunk, for the same sentence and voice)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    patterns = args.patterns.split(",")
    if set(patterns) - {"sentence", "paragraph"}:
        ap.error("--patterns takes sentence and/or paragraph")

    from chatterbox_accel.benchmark import emit, hardware, versions
    from chatterbox_accel.cli import _random_english
    from chatterbox_accel.e2e import stop_after_for
    from chatterbox_accel.server.launch import TINY_FACTORY, start_server

    stop = stop_after_for(args.seconds)
    folder = Path(args.checkpoint) if args.checkpoint else _random_english(stop, args.voice_seconds)
    print(f"checkpoint {folder}" + ("" if args.checkpoint else f" (random weights, T3 stops after ~{stop} tokens)"),
          file=sys.stderr)
    extra = [x for o in args.option for x in ("--option", o)]
    cpus = None
    if args.ray:
        cpus = args.cpus_per_replica or max(1, (os.cpu_count() or 1) // args.ray)
        extra += ["--ray", "--replicas", str(args.ray), "--cpus-per-replica", str(cpus)]
        if args.gpus_per_replica:
            extra += ["--gpus-per-replica", str(args.gpus_per_replica)]
    with tempfile.TemporaryDirectory() as work:
        print("starting the server ...", file=sys.stderr)
        server = start_server(folder, Path(work), factory=TINY_FACTORY if args.tiny else None,
                              max_batch=args.max_batch, max_queue=args.max_queue, extra=extra)
        try:
            asyncio.run(level(server.url, 1, 1, SENTENCES[:1]))  # warm-up: first-call costs off the table
            rows = []
            for pattern in patterns:
                texts = SENTENCES if pattern == "sentence" else [PARAGRAPH]
                for c in levels:
                    row = {"pattern": pattern, **asyncio.run(level(server.url, c, max(args.requests, c), texts))}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
        finally:
            server.stop()
    baseline = None if args.no_engine_baseline else engine_first_chunk(folder, args.tiny, args.option)
    header = ("pattern", "C", "req/s", "lat p50", "lat p95", "TTFA p50", "TTFA p95", "audio s/s", "underrun", "errors")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(v) for v in (r["pattern"], r["concurrency"], r["requests_per_s"], r["latency_p50_s"],
                                          r["latency_p95_s"], r["first_audio_p50_s"], r["first_audio_p95_s"],
                                          r["audio_s_per_wall_s"], r["underrun_max_s"], r["errors"] or "-")))
    scaling = {}
    for pattern in patterns:
        by_c = {r["concurrency"]: r for r in rows if r["pattern"] == pattern}
        if 1 in by_c and max(by_c) > 1 and by_c[1]["audio_s_per_wall_s"]:
            scaling[pattern] = round(by_c[max(by_c)]["audio_s_per_wall_s"] / by_c[1]["audio_s_per_wall_s"], 2)
    summary = {"bench": "serve", "hardware": hardware(), "versions": versions(), "model": "english",
               "t3": "tiny (2 layers)" if args.tiny else "full size, random weights", "checkpoint_stop_after": stop,
               "voice_seconds": None if args.checkpoint else args.voice_seconds,
               "max_batch": args.max_batch, "options": args.option,
               "server": f"ray serve, {args.ray} replica(s), {cpus} CPU(s) each" if args.ray else "single process", "date": time.strftime("%Y-%m-%d"),
               "throughput_scaling_max_vs_1": scaling, "engine_first_chunk_s": baseline, "levels": rows}
    c1 = next((r for r in rows if r["pattern"] == "sentence" and r["concurrency"] == 1), None)
    if baseline and c1 and c1["first_audio_p50_s"]:
        summary["first_audio_c1_vs_engine"] = round(c1["first_audio_p50_s"] / baseline, 3)
        print(f"time to first audio at concurrency 1: {c1['first_audio_p50_s']:.2f} s over HTTP, "
              f"{baseline:.2f} s from the engine in process ({summary['first_audio_c1_vs_engine']:.2f}x)")
    emit(summary, args.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

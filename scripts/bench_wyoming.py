#!/usr/bin/env python
"""Wyoming's streamed text in, against the HTTP route: time from the first complete sentence
to its first audio chunk, beside the HTTP route's time to first byte for the same sentence.

Starts `chatterbox-accel serve --wyoming` on 127.0.0.1 (full-size English on random weights; a
--voice-seconds built-in voice), warms both routes up, then alternates --repeats times: the HTTP
route (raw PCM, time to the first body byte) and a Wyoming stream (`synthesize-start`, the
sentence as one `synthesize-chunk` ending in a space, i.e. complete; time to the first
`audio-chunk`; then `synthesize-stop`). A table, then ONE JSON line.

    python scripts/bench_wyoming.py [--repeats 3] [--seconds 3] [--voice-seconds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


async def http_first_byte(url: str, seed: int) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        async with http.stream("POST", "/v1/audio/speech", json={"input": SENTENCE, "response_format": "pcm",
                                                                "seed": seed}) as r:
            first = None
            async for _ in r.aiter_raw():  # read it all (the engine finishes the request either way)
                if first is None:
                    first = time.perf_counter() - start
    return first


async def wyoming_first_chunk(port: int, seed: int) -> float:
    from wyoming.audio import AudioChunk, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.event import Event
    from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

    async with AsyncTcpClient("127.0.0.1", port) as client:
        start_event = SynthesizeStart().event()
        await client.write_event(Event(start_event.type, {**start_event.data, "seed": seed}))
        start = time.perf_counter()
        await client.write_event(SynthesizeChunk(text=SENTENCE + " ").event())  # complete: it ends a sentence
        first = None
        while True:
            event = await client.read_event()
            if event is None or event.type == "error":
                raise RuntimeError(f"the server ended the stream: {event.data if event else 'closed'}")
            if AudioChunk.is_type(event.type) and first is None:
                first = time.perf_counter() - start
                await client.write_event(SynthesizeStop().event())
            if SynthesizeStopped.is_type(event.type) or (AudioStop.is_type(event.type) and first is None):
                return first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--voice-seconds", type=float, default=3.0)
    ap.add_argument("--checkpoint")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer T3 (a smoke run, not a measurement)")
    ap.add_argument("--out", help="also append the JSON line to this file")
    args = ap.parse_args()

    from chatterbox_accel.benchmark import emit, hardware, versions
    from chatterbox_accel.cli import _random_english
    from chatterbox_accel.e2e import stop_after_for
    from chatterbox_accel.server.launch import TINY_FACTORY, free_port, start_server

    stop = stop_after_for(args.seconds)
    folder = Path(args.checkpoint) if args.checkpoint else _random_english(stop, args.voice_seconds)
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        server = start_server(folder, Path(work), factory=TINY_FACTORY if args.tiny else None,
                              extra=["--wyoming", "--wyoming-uri", f"tcp://127.0.0.1:{port}"])
        try:
            asyncio.run(http_first_byte(server.url, 0))  # warm-ups
            asyncio.run(wyoming_first_chunk(port, 0))
            http, wyoming = [], []
            for i in range(args.repeats):
                http.append(asyncio.run(http_first_byte(server.url, i + 1)))
                wyoming.append(asyncio.run(wyoming_first_chunk(port, i + 1)))
                print(f"repeat {i}: HTTP first byte {http[-1]:.2f} s, Wyoming first chunk {wyoming[-1]:.2f} s",
                      file=sys.stderr)
        finally:
            server.stop()
    h, w = statistics.median(http), statistics.median(wyoming)
    print(f"{'route':40s} {'median':>8s}  runs")
    print(f"{'HTTP /v1/audio/speech, first byte':40s} {h:7.2f}s  {', '.join(f'{x:.2f}' for x in http)}")
    print(f"{'Wyoming, sentence complete -> first chunk':40s} {w:7.2f}s  {', '.join(f'{x:.2f}' for x in wyoming)}")
    emit({"bench": "wyoming", "hardware": hardware(), "versions": versions(),
                       "t3": "tiny (2 layers)" if args.tiny else "full size, random weights",
                       "checkpoint_stop_after": stop, "voice_seconds": args.voice_seconds, "sentence": SENTENCE,
                       "http_first_byte_s": [round(x, 3) for x in http], "wyoming_first_chunk_s": [round(x, 3) for x in wyoming],
                       "median_http_s": round(h, 3), "median_wyoming_s": round(w, 3), "ratio": round(w / h, 3),
                       "date": time.strftime("%Y-%m-%d")}, args.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

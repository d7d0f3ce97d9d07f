#!/usr/bin/env python
"""Soak test of the speech server: --minutes of steady load over --voices voices, the server's
resident memory sampled, every status counted.

Starts `chatterbox-accel serve` on 127.0.0.1 (a random-weight English checkpoint; `--tiny` for a
2-layer T3), uploads --voices synthetic reference voices through POST /v1/audio/voices (more
than the engine's registry keeps, with --registry-voices lower, so eviction and recomputation
run), then keeps --concurrency clients sending one sentence each with a random voice until the
time is up. Every --sample seconds: the server's RSS (from /proc), requests done, statuses.
Prints the samples, then ONE JSON line: RSS first/last/max after warm-up, growth, 5xx count.

    python scripts/soak_serve.py [--minutes 10] [--voices 8] [--concurrency 4] [--tiny]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

SENTENCES = ["Hello there, how are you today?", "The weather is lovely this morning.",
             "Please send me the report by Friday.", "This is a quick test of the server."]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def run(url: str, pid: int, args, voices: list[str]) -> dict:
    import httpx

    statuses: dict[str, int] = {}
    samples, done = [], 0
    stop_at = time.time() + args.minutes * 60
    rng = random.Random(0)

    async def client(http):
        nonlocal done
        while time.time() < stop_at:
            body = {"input": rng.choice(SENTENCES), "voice": rng.choice(voices), "response_format": "mp3",
                    "seed": rng.randrange(1 << 30)}
            try:
                async with http.stream("POST", "/v1/audio/speech", json=body) as r:
                    async for _ in r.aiter_raw():
                        pass
                    key = str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            done += 1

    async def sampler():
        start = time.time()
        while time.time() < stop_at:
            samples.append({"t_s": round(time.time() - start), "rss_mb": round(rss_mb(pid)), "requests": done,
                            "statuses": dict(statuses)})
            print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            await asyncio.sleep(args.sample)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(sampler(), *[client(http) for _ in range(args.concurrency)])
    samples.append({"t_s": round(args.minutes * 60), "rss_mb": round(rss_mb(pid)), "requests": done,
                    "statuses": dict(statuses)})
    return {"samples": samples, "statuses": statuses, "requests": done}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--voices", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--sample", type=float, default=15, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the samples before the memory baseline")
    ap.add_argument("--checkpoint")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer T3 (more requests per minute)")
    ap.add_argument("--out", help="also append the JSON line to this file")
    args = ap.parse_args()

    import httpx
    import soundfile as sf

    from chatterbox_accel.benchmark import emit, hardware, versions
    from chatterbox_accel.checkpoints import synthetic_voice
    from chatterbox_accel.cli import _random_english
    from chatterbox_accel.server.launch import TINY_FACTORY, start_server

    folder = Path(args.checkpoint) if args.checkpoint else _random_english(25, 3)
    with tempfile.TemporaryDirectory() as work:
        server = start_server(folder, Path(work), factory=TINY_FACTORY if args.tiny else None, max_batch=8,
                              max_queue=64)
        try:
            names = []
            for i in range(args.voices):
                buf = io.BytesIO()
                sf.write(buf, synthetic_voice(3.0, seed=100 + i).numpy(), 24000, format="WAV")
                r = httpx.post(f"{server.url}/v1/audio/voices", data={"name": f"soak{i}"},
                               files={"audio_sample": ("v.wav", buf.getvalue(), "audio/wav")}, timeout=120)
                r.raise_for_status()
                names.append(f"soak{i}")
            result = asyncio.run(run(server.url, server.process.pid, args, names + ["default"]))
        finally:
            server.stop()
    rss = [s["rss_mb"] for s in result["samples"]]
    base = rss[max(1, int(len(rss) * args.warmup)) - 1]
    errors_5xx = sum(n for k, n in result["statuses"].items() if k.startswith("5") or not k.isdigit())
    summary = {"bench": "soak_serve", "hardware": hardware(), "versions": versions(), "minutes": args.minutes,
               "voices": args.voices + 1, "concurrency": args.concurrency,
               "t3": "tiny (2 layers)" if args.tiny else "full size, random weights", "requests": result["requests"],
               "statuses": result["statuses"], "errors_5xx_or_transport": errors_5xx,
               "rss_mb_after_warmup": base, "rss_mb_last": rss[-1], "rss_mb_max": max(rss),
               "rss_growth_mb": rss[-1] - base, "date": time.strftime("%Y-%m-%d"), "samples": result["samples"]}
    emit(summary, args.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""T3 alone: the accelerated single-utterance decode vs the batch engine's decoder, alternating.

    python scripts/bench_batch_t3.py [--n 8] [--repeats 5] [--tokens 75] [--attention auto|sdpa|native]
        [--out bench/results/NAME.json]

On one full-size English model (random weights, T3 stopping after --tokens speech tokens), each
repeat times (a) the N texts one after another through the accelerated `T3.inference` (what
`generate()` calls: its one-slot decoder, each request under `torch.manual_seed(seed)`), then (b)
the same N requests in one decoder of N slots (each with its own seeded generator: what
`generate_batch` runs). Only T3 runs (text tokens and conditionals are prepared before timing),
so S3Gen's minutes between T3 stages, and a shared VM's drift over them, do not enter the
comparison. Reports each side's aggregate speech tokens per second (prefill and decode), the
median over the repeats, and their ratio; a table, then one JSON line.
"""
import argparse
import logging
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from chatterbox_accel import accelerate  # noqa: E402
from chatterbox_accel.api import runner_of  # noqa: E402
from chatterbox_accel.benchmark import emit, hardware, versions  # noqa: E402
from chatterbox_accel.checkpoints import write_english_checkpoint  # noqa: E402
from chatterbox_accel.families import generate_options  # noqa: E402
from chatterbox_accel.stream import text_tokens_for  # noqa: E402

from bench_batch import TEXTS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=75)
    ap.add_argument("--attention", default="auto", help="accelerate()'s attention option (both paths)")
    ap.add_argument("--checkpoint", default="/tmp/chatterbox-accel-bench-english")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from chatterbox.tts import ChatterboxTTS

    model = ChatterboxTTS.from_local(write_english_checkpoint(args.checkpoint, stop_after=args.tokens,
                                                              voice_seconds=3.0), "cpu")
    report = accelerate(model, attention=args.attention)
    runner = runner_of(model)
    opts = {k: v for k, v in generate_options(model).items() if k in runner.row_options}
    texts = [TEXTS[i % len(TEXTS)] for i in range(args.n)]
    seeds = list(range(100, 100 + args.n))
    with torch.inference_mode():
        tokens = [text_tokens_for(model, t, opts["cfg_weight"]) for t in texts]

    def single():
        n = 0
        for text_tokens, seed in zip(tokens, seeds):
            torch.manual_seed(seed)
            n += model.t3.inference(t3_cond=model.conds.t3, text_tokens=text_tokens, max_new_tokens=1000,
                                    **opts).shape[-1]
        return n

    def batch():
        with torch.inference_mode():
            requests = [runner.request(model.conds.t3, t, opts, 1000, torch.Generator().manual_seed(s))
                        for t, s in zip(tokens, seeds)]
        runner.claim()
        return sum(t.numel() for _, t in runner.decoder(args.n).run(requests))

    single(), batch()  # warm-up: kernels, the voice prefix, the N-slot cache
    rates = {"accelerated single": [], "batch decoder": []}
    for rep in range(args.repeats):
        for name, fn in (("accelerated single", single), ("batch decoder", batch)):
            start = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["batch decoder"] / med["accelerated single"]
    print(hardware())
    print(f"{'path':<20} {'median tok/s':>12}   runs (tok/s)")
    for name, values in rates.items():
        print(f"{name:<20} {med[name]:>12.1f}   " + ", ".join(f"{v:.1f}" for v in values))
    print(f"N={args.n}: the batch decoder's T3 throughput is {ratio:.2f}x the accelerated single utterance's "
          f"(medians of {args.repeats} alternating runs)")
    emit(dict(bench="batch_t3", family="english", weights="random", hardware=hardware(), versions=versions(),
              n=args.n, tokens_per_utterance=args.tokens, repeats=args.repeats,
              command=f"python scripts/bench_batch_t3.py --n {args.n} --repeats {args.repeats} --tokens {args.tokens}"
                      + ("" if args.attention == "auto" else f" --attention {args.attention}"),
              kernels=report.kernels.describe() if report.kernels else None, attention=report.attention,
              tok_s=rates, median_tok_s=med, ratio=ratio), args.out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""S3Gen's flow over the engine's stream windows, in calls of 1, 2, ... rows: does batching the
windows of several streams into one flow call pay on this machine, on F.linear and on the packed
(oneDNN) products? Full-size English on random weights (a random model's compute is a trained
one's).

    python scripts/bench_flow_group.py [--windows 4] [--voice-seconds 3] [--out bench/results/NAME.json]

Two window shapes, as the engine's chunks make them: a first chunk (the voice prompt + 12 new
tokens, not finalized) and a second one (+ 12 tokens of context and 25 new). For each shape,
kernel (F.linear; the packed products forced on, whatever the model's gate decided) and group
size (1, 2, all), the seconds for the flows of all windows, once (the runs are long: seconds
each). A table on stderr, then ONE JSON line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--voice-seconds", type=float, default=3.0)
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch
    from chatterbox.tts import ChatterboxTTS

    import chatterbox_accel
    from chatterbox_accel.benchmark import emit, hardware, versions
    from chatterbox_accel.cli import _random_english
    from chatterbox_accel.e2e import stop_after_for
    from chatterbox_accel.s3gen_kernels import BatchGate, batch_products, prepare
    from chatterbox_accel.s3gen_stream import S3GenStreamer, _flow

    model = ChatterboxTTS.from_local(str(_random_english(stop_after_for(3.0), args.voice_seconds)), "cpu")
    report = chatterbox_accel.accelerate(model, s3gen_kernel="batch")
    from chatterbox_accel.patching import state_of

    gate: BatchGate = state_of(model, "s3gen_batch_gate")
    gate.prepare()
    decided = gate.note
    if gate.wrapper is None:  # force the packed products on for the comparison
        gate.wrapper, _ = prepare(model, gate.registry, "onednn")
    print(f"{hardware()}; the gate: {decided}", file=sys.stderr)

    def windows(done, new):
        out = []
        for i in range(args.windows):
            streamer = S3GenStreamer(model.s3gen, model.conds.gen, 200, generator=torch.Generator().manual_seed(i))
            g = torch.Generator().manual_seed(100 + i)
            if done:  # as after a first chunk of `done` tokens: its frames are fixed
                streamer.plan(torch.randint(0, 6561, (done,), generator=g), False)
                streamer.mel = torch.zeros(1, 80, streamer.ratio * (done - streamer.lookahead))
            out.append((i, streamer.plan(torch.randint(0, 6561, (new,), generator=g), False)))
        return out

    rows = []
    with torch.inference_mode():
        for shape, done, new in (("first_chunk", 0, 12), ("second_chunk", 12, 25)):
            ws = windows(done, new)
            frames = ws[0][1].noise.shape[2]
            for group in sorted({1, 2, args.windows}):
                for kernel in ("F.linear", "packed"):
                    start = time.perf_counter()
                    for k in range(0, len(ws), group):
                        if kernel == "packed":
                            with batch_products(model):
                                _flow(ws[k : k + group])
                        else:
                            _flow(ws[k : k + group])
                    seconds = time.perf_counter() - start
                    rows.append({"shape": shape, "frames": frames, "kernel": kernel, "group": group,
                                 "seconds": round(seconds, 2)})
                    print(rows[-1], file=sys.stderr, flush=True)
    emit({"bench": "flow_group", "hardware": hardware(), "versions": versions(), "model": "english",
          "s3gen": "full size, random weights", "voice_seconds": args.voice_seconds, "windows": args.windows,
          "gate": decided, "accelerated": report.applied, "rows": rows,
          "date": time.strftime("%Y-%m-%d")}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

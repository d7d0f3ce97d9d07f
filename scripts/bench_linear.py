#!/usr/bin/env python
"""The kernel measurement behind T3's CPU kernel table (chatterbox_accel/t3/kernels.py), CPU only.

One pass over many distinct 4096x1024 weights (T3's MLP shape), best of 5, for every candidate
kernel of every weight format (`kernels.KERNELS`: float32 plain `F.linear`, `W @ x^T`, oneDNN
packed; bfloat16; int8; int4) at 1 and 2 rows (decode) and 16 (a batch of 8 CFG pairs), then
GFLOP/s at the prefill's row counts. What `accelerate()` measures on a sample of the model's own weights, at full size.
Prints the CPU model and its matrix features first, a table, then one JSON line.

    python scripts/bench_linear.py [--weights 120] [--precision float32,bfloat16,int8,int4]
"""
import argparse
import json
import time

import torch

from chatterbox_accel.benchmark import hardware, versions
from chatterbox_accel.t3 import kernels


def best(fn, reps=5):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def runner(name, weights, rows):
    """A callable doing one product per weight with kernel `name` (its copies prepared now)."""
    kernel = kernels.KERNELS[name]
    if kernel.prepare is None:
        return lambda x: [torch.nn.functional.linear(x, w) for w in weights]
    copies = [kernel.prepare(w, rows)[0] for w in weights]
    return lambda x: [kernel.run(x, c) for c in copies]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=int, default=120, help="distinct 4096x1024 weights (120 = 2 GB fp32)")
    ap.add_argument("--precision", default=",".join(kernels.PRECISIONS))
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(4096, 1024) * 0.02 for _ in range(args.weights)]
    gb = sum(w.numel() * 4 for w in weights) / 1e9
    names = [n for p in args.precision.split(",") for n in kernels.candidates(p)]
    print(f"{hardware()}; torch {versions()['torch']}; {args.weights} weights, {gb:.2f} GB as float32")
    result = {"benchmark": "linear_kernels", "hardware": hardware(), **versions(), "weights_gb_fp32": round(gb, 3),
              "decode_ms": {}, "prefill_gflops": {}}
    print(f"{'kernel':12s} {'format':9s} {'1 row ms':>9s} {'2 rows ms':>10s} {'16 rows ms':>11s}   "
          f"(one pass over all weights; 16 rows: a batch of 8 CFG pairs)")
    with torch.inference_mode():
        for name in names:
            row = {}
            for rows in (1, 2, 16):
                if kernels.KERNELS[name].max_rows is not None and rows > kernels.KERNELS[name].max_rows:
                    continue
                run = runner(name, weights, rows)
                x = torch.randn(rows, 1024)
                run(x)
                row[rows] = best(lambda: run(x))
                del run
            result["decode_ms"][name] = {r: round(t * 1e3, 1) for r, t in row.items()}
            print(f"{name:12s} {kernels.KERNELS[name].precision:9s} {row[1] * 1e3:9.1f} {row[2] * 1e3:10.1f} "
                  f"{row.get(16, float('nan')) * 1e3:11.1f}")
        few = weights[:24]
        print(f"{'kernel':12s} " + " ".join(f"{r:>7d}" for r in (16, 32, 68, 204, 400)) + "   (GFLOP/s at these rows, 24 weights)")
        for name in names:
            if kernels.KERNELS[name].max_rows is not None:
                continue
            run = runner(name, few, 2)
            rates = {}
            for rows in (16, 32, 68, 204, 400):
                x = torch.randn(rows, 1024)
                run(x)
                rates[rows] = 2 * rows * 4096 * 1024 * len(few) / 1e9 / best(lambda: run(x), 3)
            result["prefill_gflops"][name] = {r: round(v, 1) for r, v in rates.items()}
            print(f"{name:12s} " + " ".join(f"{v:7.0f}" for v in rates.values()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

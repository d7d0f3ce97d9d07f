#!/usr/bin/env python
"""The kernel measurement behind `cpu_prepack` (chatterbox_accel/t3/prepack.py), CPU only.

One pass over many distinct 4096x1024 fp32 weights (T3's MLP shape), best of 5, for MKL's
`F.linear`, the runner's plain `W @ x^T` (`t3.model.linear`) and oneDNN on prepacked copies;
then GFLOP/s at the prefill's row counts.

    python scripts/bench_linear.py [--weights 120]
"""
import argparse
import time
import types

import torch
import torch.nn.functional as F

from chatterbox_accel.benchmark import hardware, versions
from chatterbox_accel.t3.model import linear
from chatterbox_accel.t3.prepack import _pack, _packed_linear


def best(fn, reps=5):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=int, default=120, help="distinct 4096x1024 weights (120 = 2 GB)")
    args = ap.parse_args()
    torch.manual_seed(0)
    mods = [types.SimpleNamespace(weight=torch.randn(4096, 1024), bias=None) for _ in range(args.weights)]
    gb = sum(m.weight.numel() * 4 for m in mods) / 1e9
    print(f"{hardware()}; torch {versions()['torch']}; {args.weights} weights, {gb:.2f} GB")
    print(f"{'rows':>5} {'F.linear':>10} {'W @ x^T':>10} {'oneDNN packed':>14}   (ms per pass)")
    for rows in (1, 2):
        x = torch.randn(rows, 1, 1024)
        packed = [_pack(m.weight, rows) for m in mods]
        a = best(lambda: [F.linear(x, m.weight) for m in mods])
        b = best(lambda: [linear(m, x) for m in mods])
        c = best(lambda: [_packed_linear(x, p, None) for p in packed])
        print(f"{rows:5d} {a * 1e3:10.0f} {b * 1e3:10.0f} {c * 1e3:14.0f}   "
              f"({gb / a:.0f} / {gb / b:.0f} / {gb / c:.0f} GB/s)")
    few = mods[:24]
    packed = [_pack(m.weight, 2) for m in few]
    print(f"{'rows':>5} {'MKL GFLOP/s':>12} {'oneDNN GFLOP/s':>15}   (24 weights, packed for 2 rows)")
    for rows in (16, 32, 68, 204, 400):
        x = torch.randn(rows, 1024)
        flops = 2 * rows * 4096 * 1024 * len(few) / 1e9
        a = best(lambda: [F.linear(x, m.weight) for m in few], 3)
        c = best(lambda: [_packed_linear(x, p, None) for p in packed], 3)
        print(f"{rows:5d} {flops / a:12.0f} {flops / c:15.0f}")


if __name__ == "__main__":
    main()

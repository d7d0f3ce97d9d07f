#!/usr/bin/env python
"""The output check's gate on every reduced-precision CPU kernel, pinned (no speed rule), on the
realistic full-size English T3 (peaked logits, outlier channels: chatterbox_accel/realistic.py).

    python scripts/bench_gate.py [--realistic 2.0]

Prints, per kernel, whether it passed and its figures (mean / max total variation of the
sampling distributions against float32, decisive-argmax agreement), then one JSON line.
"""
import argparse
import json
import logging
import os
import types
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

from chatterbox_accel import accelerate, restore  # noqa: E402
from chatterbox_accel.benchmark import hardware, versions  # noqa: E402
from chatterbox_accel.checkpoints import full_t3  # noqa: E402

KERNELS = [("bfloat16", "onednn-bf16"), ("bfloat16", "bf16"), ("int8", "fbgemm-int8"), ("int8", "int8pack"),
           ("int4", "int4pack")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realistic", type=float, default=2.0, help="mean entropy of the probe's logits, nats")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    model = types.SimpleNamespace(t3=full_t3(realistic=args.realistic), conds=None)
    rows = {}
    for precision, kernel in KERNELS:
        report = accelerate(model, precision=precision, cpu_kernel=kernel)
        try:
            unsupported = report.fallbacks.get("t3.cpu_kernels", "")
            if unsupported:
                rows[kernel] = {"precision": precision, "unsupported": unsupported}
                continue
            tried = report.refused[0][1] if report.refused else report.check
            rows[kernel] = {"precision": precision, "passed": not report.refused, "tv_mean": tried.tv_mean,
                            "tv_max": tried.tv_max, "decisive_argmax": tried.decisive_agreement,
                            "kl_mean": tried.kl_mean}
        finally:
            restore(model)
    print(f"gate on the realistic checkpoint (entropy {args.realistic} nats): {hardware()}")
    for kernel, r in rows.items():
        if "unsupported" in r:
            print(f"{kernel:12s} not supported here")
        else:
            print(f"{kernel:12s} {'passed' if r['passed'] else 'REFUSED':8s} TV mean {r['tv_mean']:.3f} max "
                  f"{r['tv_max']:.3f}, decisive argmax {r['decisive_argmax']:.0%}, KL {r['kl_mean']:.3g}")
    print(json.dumps({"benchmark": "gate", "realistic_entropy": args.realistic, "kernels": rows,
                      "command": f"python scripts/bench_gate.py --realistic {args.realistic:g}",
                      "hardware": hardware(), **versions()}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Side-by-side T3 decode benchmark: original chatterbox T3.inference vs chatterbox_accel.

Same random weights (full-size T3 unless --layers), CFG batch 2, N tokens per run, warm-up then
alternating repeats; prints a table, then one JSON line last.

    python scripts/bench_t3.py --tokens 40 --repeats 3 [--multilingual | --turbo] [--no-prepack]
        [--precision float32,int8,...] [--kernel NAME] [--variants default,graphs,eager,bf16]

Each --precision value (or --variants name) is one accelerated variant, run in the same process
on the same weights (alternating with the original, which is timed once for all of them), so
the table's ratios are measured side by side. The JSON line records, per variant, what ran:
applied, fallbacks, run-time events and CUDA graphs captured.
"""
import argparse
import logging
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the original's per-step progress bar

import torch  # noqa: E402

from chatterbox_accel.benchmark import bench_t3, json_line  # noqa: E402
from chatterbox_accel.checkpoints import full_t3, tiny_t3, tiny_turbo_t3  # noqa: E402


# --variants: named step variants (a GPU's first profile times them all against one original).
VARIANTS = {
    "default": {},                                              # CUDA: compile + CUDA graphs
    "graphs": {"compile": False},                               # CUDA graphs of the eager step
    "compile": {"cuda_graphs": False},                          # torch.compile only
    "eager": {"compile": False, "cuda_graphs": False},
    "bf16": {"dtype": "bfloat16"},                              # compile + graphs in bf16
    "bf16-graphs": {"dtype": "bfloat16", "compile": False},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=40, help="speech tokens per run (default 40)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=0, help="tiny T3 with this many layers (0 = full size)")
    ap.add_argument("--multilingual", action="store_true",
                    help="multilingual T3 (its original loop runs the alignment analyzer on eager attention)")
    ap.add_argument("--turbo", action="store_true", help="Turbo's GPT-2 T3 (inference_turbo, 375-token voice prompt)")
    ap.add_argument("--no-compile", action="store_true", help="disable torch.compile / CUDA graphs")
    ap.add_argument("--no-prepack", action="store_true", help="CPU: never the oneDNN-packed kernel (cpu_prepack=False)")
    ap.add_argument("--precision", default="float32",
                    help="comma-separated T3 weight formats, one variant each: float32,bfloat16,int8,int4")
    ap.add_argument("--kernel", default="auto", help="CPU: pin a kernel (cpu_kernel) instead of measuring")
    ap.add_argument("--realistic", type=float, metavar="ENTROPY", help="English/Multilingual: peaked logits "
                    "(mean entropy, nats) and outlier channels, as a trained T3 (chatterbox_accel/realistic.py)")
    ap.add_argument("--variants", default="", help=f"comma-separated named variants instead of --precision: "
                    f"{', '.join(VARIANTS)}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    mtl = args.multilingual
    if args.turbo:
        t3 = tiny_turbo_t3(layers=args.layers or 24).to(args.device)
    else:
        t3 = (tiny_t3(layers=args.layers, multilingual=mtl, realistic=args.realistic) if args.layers
              else full_t3(multilingual=mtl, realistic=args.realistic)).to(args.device)
    options = {"dtype": args.dtype}
    if args.no_compile:
        options.update(compile=False, cuda_graphs=False)
    if args.no_prepack:
        options.update(cpu_prepack=False)
    variants = {}
    for name in filter(None, args.variants.split(",")):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        variants[name] = {**options, **VARIANTS[name]}
    for precision in args.precision.split(",") if not variants else ():
        name = "accelerated" if precision == "float32" else f"accelerated {precision}"
        variants[name] = {**options, "precision": precision, "cpu_kernel": args.kernel}
    result = bench_t3(t3, tokens=args.tokens, repeats=args.repeats, warmup=args.warmup, variants=variants)
    print(result.table())
    summary = result.summary()
    summary["realistic_entropy"] = args.realistic
    summary["command"] = "python scripts/bench_t3.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if v != ap.get_default(k))
    print(json_line(summary))


if __name__ == "__main__":
    main()

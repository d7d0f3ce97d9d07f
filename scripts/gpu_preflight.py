#!/usr/bin/env python
"""The first seconds of a GPU check: can this machine run Chatterbox at all? (< 30 s)

Checks, in order, and stops at the first failure with its fix:
- `pkg_resources` imports (resemble-perth needs it; setuptools >= 82 no longer ships it, and then
  `perth.PerthImplicitWatermarker` is None and every Chatterbox constructor raises TypeError);
- the watermarker constructs;
- each model class of chatterbox-tts (English, Multilingual, Turbo, VC) constructs: what a
  wheel set that only imports cleanly would not show;
- a 2-layer random T3 on the device runs upstream's own `T3.inference` for a few tokens.

Prints one JSON line last: {"benchmark": "preflight", "ok": ..., "failed": <check>, "error": ...,
"hardware", versions}; exit status 1 when a check failed.

    python scripts/gpu_preflight.py [--device cuda|cpu]
"""
import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def construct_families(device: str) -> list[str]:
    """Construct each model class around placeholder parts (the constructors only store them and
    build the watermarker); returns the class names constructed."""
    import importlib

    from chatterbox_accel.families import FAMILIES

    made = []
    for family in FAMILIES.values():
        cls = getattr(importlib.import_module(family.module), family.class_name)
        if family.name == "vc":
            cls(s3gen=None, device=device)
        else:
            cls(t3=None, s3gen=None, ve=None, tokenizer=None, device=device)
        made.append(family.class_name)
    return made


def original_decode(device: str) -> int:
    """Upstream's own T3 loop on a 2-layer random T3 on `device`: speech tokens decoded."""
    import dataclasses

    import torch

    from chatterbox_accel.check import probe_inputs
    from chatterbox_accel.checkpoints import tiny_t3

    t3 = tiny_t3(seed=0, layers=2).to(device)
    t3_cond, text, _ = probe_inputs(t3, None, 1)
    with torch.inference_mode():
        out = type(t3).inference(t3, t3_cond=dataclasses.replace(t3_cond, cond_prompt_speech_emb=None),
                                 text_tokens=text, max_new_tokens=4)
    return int(out.shape[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    start = time.perf_counter()
    line = {"benchmark": "preflight", "device": args.device, "ok": False}
    checks = [
        ("pkg_resources", lambda: __import__("pkg_resources").__name__,
         "install setuptools<81 (the GPU wheels carry setuptools 80.9.0: put it on the path first)"),
        ("watermarker", lambda: type(__import__("perth").PerthImplicitWatermarker()).__name__,
         "perth.PerthImplicitWatermarker is None when pkg_resources is missing: install setuptools<81"),
        ("families", lambda: construct_families(args.device), "see the error: a chatterbox-tts dependency is missing"),
        ("original_t3", lambda: original_decode(args.device), "the device cannot run upstream's T3 loop"),
    ]
    try:
        import torch

        from chatterbox_accel.benchmark import hardware, versions

        line.update(hardware=hardware(), cuda=torch.cuda.is_available(), **versions())
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
    except Exception as exc:
        line.update(failed="imports", error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(line))
        return 1
    for name, check, fix in checks:
        try:
            line[name] = check()
        except Exception as exc:
            traceback.print_exc()
            line.update(failed=name, error=f"{type(exc).__name__}: {exc}", fix=fix)
            break
    else:
        line["ok"] = True
    line["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(line))
    return 0 if line["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

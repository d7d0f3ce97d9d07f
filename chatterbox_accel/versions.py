"""The version guard: what chatterbox-accel was tested with, and what that means elsewhere.

The fast paths mirror chatterbox-tts 0.1.7's internals (T3.inference, inference_turbo, the
alignment analyzer, generate()'s text handling, the flow's solver). On another chatterbox-tts
version each one must be verified on the model at hand or not used:
- the T3 loops are verified by the output check (so with `check=False` they are refused);
- `generate_stream` reproduces generate() and S3Gen's flow step by step, which no probe
  verifies, so it is refused;
- the S3Gen fast modes run only behind their mel probe (refused with `check=False`).
Untested torch / transformers versions are reported, not refused: every fast path's output
check still runs against the original code on the installed stack.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# Package -> the versions (prefixes) this project's tests ran on: torch 2.6 (the reference stack,
# the whole suite) and 2.11 (CI's second leg, scripts/test_newest_torch.sh: the parity tier), on CPU.
TESTED = {"chatterbox-tts": ("0.1.7",), "torch": ("2.6.", "2.11."), "transformers": ("5.2.0",)}


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def untested() -> dict:
    """{package: installed version} for each package whose version was not tested."""
    out = {}
    for package, prefixes in TESTED.items():
        found = installed(package)
        if found is not None and not any(found.startswith(p) for p in prefixes):
            out[package] = found
    return out


def chatterbox_reason(what: str) -> str | None:
    """Why `what` (a fast path mirroring 0.1.7 internals) is refused on this chatterbox-tts, or None."""
    found = untested().get("chatterbox-tts")
    if found is None:
        return None
    return (f"{what} mirrors chatterbox-tts 0.1.7's internals and chatterbox-tts {found} is installed "
            f"(untested)")

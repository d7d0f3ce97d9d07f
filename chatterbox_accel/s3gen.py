"""S3Gen: `torch.compile` of the flow's CFM estimator, opt-in, checked, with fallback.

The estimator (a U-Net of causal conv blocks and 56 transformer blocks) is ~95 % of S3Gen's
time: 10 Euler steps, each a CFG batch of 2 over the voice prompt's mel frames plus the new
ones (Turbo's meanflow: 2 steps, no CFG). Its full attention over the whole sequence leaves no
exact cache of the prompt frames, so the only exact speed-up is running it faster.

`compile_estimator(model, mode)` compiles `estimator.forward` with `dynamic=True` (lengths
change every call), runs it once on a probe against the eager estimator, and installs it only
if it ran and agreed within `tolerance`; otherwise it returns the reason, and the estimator
stays eager. At run time `CompiledEstimator` drops back to the eager forward for good if the
compiled one ever raises. It is off by default (`compile_targets=("t3", "s3gen")` turns it on):
on the 2-core CPU measured it took 89 s to compile and was 1.22x faster at 300 frames but
0.93x at 560 (see README); on a GPU it is not measured yet.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

PROBE_FRAMES = 96


class CompiledEstimator:
    """wrapt wrapper for `estimator.forward`: the compiled forward, or the eager one after a failure."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.disabled: str | None = None
        self.calls = {"compiled": 0, "eager": 0}

    def __call__(self, wrapped, instance, args, kwargs):
        if self.disabled is None:
            try:
                out = self.compiled(*args, **kwargs)
                self.calls["compiled"] += 1
                return out
            except Exception as exc:  # an optimization must never kill generation
                self.disabled = f"{type(exc).__name__}: {exc}"
                logger.warning("chatterbox_accel: compiled S3Gen estimator failed (%s); using the eager "
                               "one from now on", self.disabled)
        self.calls["eager"] += 1
        return wrapped(*args, **kwargs)


def estimator_of(model):
    flow = getattr(getattr(model, "s3gen", None), "flow", None)
    return getattr(getattr(flow, "decoder", None), "estimator", None)


def probe_args(estimator, frames: int = PROBE_FRAMES):
    """Deterministic estimator inputs (x, mask, mu, t, spks, cond[, r]) of `frames` frames."""
    p = next(estimator.parameters())
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

    meanflow = getattr(estimator, "meanflow", False)
    batch = 1 if meanflow else 2
    args = dict(x=randn(batch, 80, frames), mask=torch.ones(batch, 1, frames, device=p.device, dtype=p.dtype),
                mu=randn(batch, 80, frames), t=torch.full((batch,), 0.3, device=p.device, dtype=p.dtype),
                spks=randn(batch, 80), cond=randn(batch, 80, frames))
    if meanflow:
        args["r"] = torch.full((batch,), 0.6, device=p.device, dtype=p.dtype)
    return args


def compile_estimator(model, registry, *, mode: str = "default", tolerance: float = 1e-3,
                      backend: str = "inductor") -> str | None:
    """Compile and install the estimator; None when installed, else why not (eager kept)."""
    estimator = estimator_of(model)
    if estimator is None:
        return "no S3Gen flow estimator on this model"
    eager = estimator.forward
    try:
        options = {"mode": mode} if backend == "inductor" else {}
        compiled = torch.compile(eager, dynamic=True, backend=backend, **options)
        with torch.inference_mode():  # as S3Gen calls it: inference tensors (no recompile later)
            probe = probe_args(estimator)
            want = eager(**probe)
            got = compiled(**probe)
        diff = (got.float() - want.float()).abs().max().item()
        scale = max(want.float().abs().max().item(), 1e-12)
    except Exception as exc:
        return f"torch.compile of the S3Gen estimator failed on a warm-up call ({type(exc).__name__}: {exc})"
    if not diff <= tolerance * scale:  # also catches NaN
        return (f"compiled S3Gen estimator disagrees with the eager one on a probe: max|d| {diff:.3g} > "
                f"{tolerance:g} x max|out| {scale:.3g}")
    registry.wrap_method(estimator, "forward", CompiledEstimator(compiled))
    return None

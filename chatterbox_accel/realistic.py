"""Make a random-weight T3 (English / Multilingual, Llama) behave like a trained one where
reduced precision can tell the difference.

A random T3's speech logits are nearly flat (entropy ~8.7 nats over 8194 ids, close to uniform),
so any rounding moves its sampling distribution very little, and its activations have no outlier
channels, so quantizing them with one scale per call loses little. A trained transformer is the
opposite on both counts: peaked logits (a clear favourite most steps) and a few residual-stream
channels of much larger magnitude than the rest, which weights downstream compensate for.
Limits and kernels chosen on the flat checkpoint then fail on real weights (issue 22's table).

`make_realistic(t3, entropy=..., outliers=..., outlier_scale=...)` changes a random T3, in place:
- **Outlier channels**: `outliers` channels of every RMSNorm (each layer's two, and the final
  one) scaled up by `outlier_scale`, so every product's input has a few systematic channels much larger than
  the rest (10x by default) while the weights reading them stay ordinary, as in trained LLMs (LLM.int8()'s
  outlier features). That is what per-call (per-tensor) activation quantization suffers from and
  weight-only formats do not. (Scaling the reading weights' columns down instead would keep the
  function but move the difficulty into the weights, which trained models do not do.)
- **Peaked logits**: the speech head scaled by one factor, found by bisection so that the mean
  entropy of softmax(CFG-combined logits) over a fixed probe (the output check's prompt and
  tokens) equals `entropy` nats. The EOS row scales with it, so a `stop_after` checkpoint still
  stops where it did.

Calibrated in float32 on the model's own device; deterministic for a given seed.
"""
from __future__ import annotations

import math

import torch

DEFAULT_ENTROPY = 2.0        # nats: a clear favourite with a handful of plausible alternatives
DEFAULT_OUTLIERS = 4         # channels per norm
DEFAULT_OUTLIER_SCALE = 10.0


@torch.no_grad()
def add_outlier_channels(t3, outliers: int = DEFAULT_OUTLIERS, scale: float = DEFAULT_OUTLIER_SCALE,
                         seed: int = 7) -> list[int]:
    """Scale `outliers` channels of every RMSNorm by `scale`; returns the channels."""
    tfmr = t3.tfmr
    g = torch.Generator().manual_seed(seed)
    channels = torch.randperm(tfmr.config.hidden_size, generator=g)[:outliers].tolist()
    for layer in tfmr.layers:
        layer.input_layernorm.weight[channels] *= scale
        layer.post_attention_layernorm.weight[channels] *= scale
    tfmr.norm.weight[channels] *= scale
    return channels


def probe_entropy(logits: torch.Tensor) -> float:
    """Mean entropy (nats) of softmax over each row of (steps, V) logits."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


@torch.no_grad()
def probe_logits(t3, steps: int = 8) -> torch.Tensor:
    """The output check's CFG-combined reference logits (steps + 1, V) for this T3."""
    from .check import probe_inputs, reference_logits
    from .t3.decode import T3Runner
    from .t3.model import sdpa_attention

    t3_cond, text, forced = probe_inputs(t3, None, steps)
    embeds = T3Runner(t3, attention=sdpa_attention).build_prompt(t3_cond, text, 0.5)
    return reference_logits(t3, embeds, forced, 0.5).float()


@torch.no_grad()
def peak_logits(t3, entropy: float = DEFAULT_ENTROPY, steps: int = 8) -> float:
    """Scale the speech head so the probe's mean entropy is `entropy` nats; returns the factor.
    The head has no bias (Llama T3), so the CFG-combined logits scale with it exactly."""
    if t3.speech_head.bias is not None:
        raise ValueError("peak_logits is for a Llama T3 (English, Multilingual): its speech head has no bias")
    logits = probe_logits(t3, steps)
    flat = probe_entropy(logits)
    if not 0 < entropy < flat:
        raise ValueError(f"entropy={entropy} must be between 0 and the random head's {flat:.2f} nats")
    low, high = 1.0, 2.0
    while probe_entropy(high * logits) > entropy:
        low, high = high, high * 2
    for _ in range(40):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if probe_entropy(mid * logits) > entropy else (low, mid)
    factor = math.sqrt(low * high)
    t3.speech_head.weight.mul_(factor)
    return factor


def make_realistic(t3, entropy: float = DEFAULT_ENTROPY, outliers: int = DEFAULT_OUTLIERS,
                   outlier_scale: float = DEFAULT_OUTLIER_SCALE) -> dict:
    """Both changes (module docstring), in place; returns what was done."""
    channels = add_outlier_channels(t3, outliers, outlier_scale) if outliers else []
    factor = peak_logits(t3, entropy)
    return {"entropy": entropy, "head_factor": round(factor, 4), "outlier_channels": channels,
            "outlier_scale": outlier_scale}

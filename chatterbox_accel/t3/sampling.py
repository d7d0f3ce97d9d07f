"""Device-side CFG combine + logits processing + sampling, with no host sync.

Matches, in this order, what `T3.inference` does with transformers' processors:
CFG combine -> repetition penalty over every id generated so far (BOS included) ->
temperature -> min_p -> top_p -> softmax -> sample.

Repetition state is a (B, V) presence mask updated in place, instead of a growing id list.
The options are (B, 1) tensors per row in the decoder (`batch.RowParams`), or 0-d ones
(`SamplingParams`, one request).
Sampling uses the exponential race `argmax(p / E)`, E ~ Exp(1), which draws exactly from `p`
and, unlike `torch.multinomial`, is safe inside CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """Per-call sampling options, kept as device tensors so changing them never recompiles."""

    cfg_weight: torch.Tensor
    temperature: torch.Tensor
    repetition_penalty: torch.Tensor
    min_p: torch.Tensor
    top_p: torch.Tensor
    use_top_p: bool  # a Python flag: top_p == 1.0 filters nothing, so the sort is skipped

    @classmethod
    def make(cls, device, *, cfg_weight, temperature, repetition_penalty, min_p, top_p):
        validate(temperature=temperature, repetition_penalty=repetition_penalty, min_p=min_p, top_p=top_p)

        def scalar(v):
            return torch.tensor(float(v), dtype=torch.float32, device=device)

        return cls(scalar(cfg_weight), scalar(temperature), scalar(repetition_penalty),
                   scalar(min_p), scalar(top_p), float(top_p) < 1.0)

    def copy_(self, other: "SamplingParams"):
        """Update in place (static buffers of a captured graph)."""
        for name in ("cfg_weight", "temperature", "repetition_penalty", "min_p", "top_p"):
            getattr(self, name).copy_(getattr(other, name))
        self.use_top_p = other.use_top_p


def validate(*, temperature, repetition_penalty, min_p, top_p):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def cfg_combine(logits: torch.Tensor, cfg_weight: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (1, V): row 0 conditional, row 1 unconditional (absent without CFG)."""
    cond = logits[0:1].float()
    if logits.shape[0] == 1:
        return cond
    uncond = logits[1:2].float()
    return cond + cfg_weight * (cond - uncond)


def process_logits(logits: torch.Tensor, presence: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(1, V) float32 CFG-combined logits -> (1, V) filtered, temperature-scaled scores."""
    penalized = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
    scores = torch.where(presence, penalized, logits) / p.temperature
    probs = torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if p.use_top_p:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - p.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def sample(scores: torch.Tensor, noise=None) -> torch.Tensor:
    """(B, V) scores -> (B,) token ids, drawn from softmax(scores) without a host sync: the
    exponential race argmax(p / E), E ~ Exp(1) from the global RNG, or from `noise(probs)` (the
    decoder's per-row generators)."""
    probs = torch.softmax(scores, dim=-1)
    race = noise(probs) if noise is not None else torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / race, dim=-1)

"""The output check: patched vs original T3 on a teacher-forced probe, same weights.

The probe is deterministic: fixed text, the model's built-in voice (or a fixed synthetic one),
and a fixed sequence of forced speech tokens. The reference is the original HF `LlamaModel`
forward over the whole probe sequence, read exactly as `T3.inference` reads it
(`hidden_states[-1]` -> `speech_head` -> CFG combine). The fast path decodes the same tokens
step by step through its KV cache. They must agree within `tolerance`, measured as
max |fast - reference| / max |reference| over all steps and the whole vocabulary.

With reduced-precision T3 weights (`precision=` bfloat16 / int8 / int4) the logits cannot agree
to rounding level, so that mode is judged by what sampling sees instead: the fraction of steps
whose most likely token agrees with float32, and the KL divergence KL(p_float32 || p_mode) of
the softmax over the CFG logits, per step, against `PRECISION_LIMITS`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .t3.sampling import cfg_combine

DECISIVE_MARGIN = 1.0  # a step is decisive when float32's top-2 logits differ by at least this


@dataclass(frozen=True)
class PrecisionLimits:
    """Pass bounds of the output check for one reduced-precision T3 weight format."""

    argmax: float   # least fraction of DECISIVE probe steps whose argmax agrees with float32
    kl_mean: float  # largest mean per-step KL(p_float32 || p_mode), in nats


# Measured on random full-size weights on the probe (see README, "Reduced precision"), with a
# margin; a trained model's logits are peakier, so these bound what was seen, not what it sounds like.
PRECISION_LIMITS = {
    "bfloat16": PrecisionLimits(argmax=0.95, kl_mean=1e-3),  # measured KL 1.6e-5 (English)
    "float16": PrecisionLimits(argmax=0.95, kl_mean=1e-3),   # a GPU's dtype="float16": bf16's bounds
    "int8": PrecisionLimits(argmax=0.9, kl_mean=1e-2),       # measured 4.4e-4
    "int4": PrecisionLimits(argmax=0.8, kl_mean=5e-2),       # measured 4.0e-3
}

PROBE_TEXT_IDS = (255, 41, 15, 23, 2, 33, 19, 40, 2, 27, 9, 0)  # SOT ... EOT, valid for any vocab >= 64


@dataclass
class CheckResult:
    passed: bool
    max_abs_diff: float
    rel_diff: float
    tolerance: float
    argmax_agreement: float  # fraction of steps whose most likely token agrees
    steps: int
    attention_diff: float | None = None  # multilingual: max |d prob| of the analyzer's attention maps
    kl_mean: float = 0.0  # mean per-step KL(p_reference || p_fast) of the softmax, nats
    kl_max: float = 0.0
    decisive_agreement: float = 1.0  # argmax agreement over steps with a top-2 gap >= DECISIVE_MARGIN
    decisive_steps: int = 0
    precision: str = "float32"  # T3 weight format checked; reduced ones are judged by `limits`
    limits: PrecisionLimits | None = None

    def __str__(self):
        verdict = "passed" if self.passed else "FAILED"
        maps = "" if self.attention_diff is None else (
            f", alignment attention max|dp| {self.attention_diff:.3g}")
        judged = (f"tolerance {self.tolerance:.3g}" if self.limits is None else
                  f"{self.precision}: limits argmax >= {self.limits.argmax:.0%}, KL <= {self.limits.kl_mean:g}")
        return (f"output check {verdict}: max|dlogit| {self.max_abs_diff:.3g} "
                f"(relative {self.rel_diff:.3g}, {judged}){maps}, "
                f"argmax agreement {self.argmax_agreement:.0%} over {self.steps} steps "
                f"({self.decisive_agreement:.0%} over {self.decisive_steps} decisive), "
                f"KL mean {self.kl_mean:.3g} / max {self.kl_max:.3g}")


def probe_inputs(t3, conds_t3, steps: int, cfg_weight: float = 0.5):
    """(t3_cond, text_tokens (2, T), forced speech tokens (steps,)) on the model's device."""
    device = t3.device
    if conds_t3 is None:
        from chatterbox.models.t3.modules.cond_enc import T3Cond

        g = torch.Generator().manual_seed(1234)
        conds_t3 = T3Cond(
            speaker_emb=torch.randn(1, t3.hp.speaker_embed_size, generator=g),
            cond_prompt_speech_tokens=torch.randint(0, 6561, (1, t3.hp.speech_cond_prompt_len or 1), generator=g),
            emotion_adv=0.5 * torch.ones(1, 1, 1),
        ).to(device=device)
    # A copy, so the probe never caches embeddings into the user's conditionals; in the T3's
    # own dtype (a T3 loaded in bf16 cannot read float32 conditionals).
    t3_cond = dataclasses.replace(conds_t3, cond_prompt_speech_emb=None)
    weight_dtype = t3.speech_head.weight.dtype
    if weight_dtype != torch.float32:
        t3_cond = t3_cond.to(dtype=weight_dtype)
    text = torch.tensor([PROBE_TEXT_IDS], device=device)
    text[:, 0], text[:, -1] = t3.hp.start_text_token, t3.hp.stop_text_token
    text = text.expand(2 if cfg_weight > 0 else 1, -1)
    forced = (torch.arange(steps, device=device) * 797 + 11) % 6561
    return t3_cond, text, forced


@torch.inference_mode()
def reference_logits(t3, embeds, forced, cfg_weight) -> torch.Tensor:
    """Original-path CFG logits (N+1, V): one full forward of the untouched HF model."""
    steps = forced.numel()
    positions = torch.arange(1, steps + 1, device=embeds.device)
    tok = t3.speech_emb(forced)[None] + t3.speech_pos_emb.get_fixed_embedding(positions)  # (1, N, C)
    seq = torch.cat([embeds, tok.expand(embeds.shape[0], -1, -1)], dim=1)
    out = t3.tfmr(inputs_embeds=seq, use_cache=False, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states[-1][:, embeds.shape[1] - 1 :]  # (B, N+1, C)
    logits = t3.speech_head(hidden)
    cfg = torch.tensor(float(cfg_weight), device=embeds.device)
    return torch.stack([cfg_combine(logits[:, i], cfg)[0] for i in range(steps + 1)])


@torch.inference_mode()
def reference_attention_maps(t3, embeds, forced, heads) -> dict:
    """{layer: (P+N, P+N)} eager attention probabilities of batch row 0 for the (layer, head)
    pairs the multilingual alignment analyzer reads: what upstream's hooks see. The model's
    attention setting is switched to eager for this forward only, and put back."""
    positions = torch.arange(1, forced.numel() + 1, device=embeds.device)
    tok = t3.speech_emb(forced)[None] + t3.speech_pos_emb.get_fixed_embedding(positions)
    seq = torch.cat([embeds, tok.expand(embeds.shape[0], -1, -1)], dim=1)
    config = t3.tfmr.config
    saved = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        out = t3.tfmr(inputs_embeds=seq, use_cache=False, output_attentions=True, return_dict=True)
    finally:
        config._attn_implementation = saved
    return {layer: out.attentions[layer][0, head].float() for layer, head in heads}


# The alignment analyzer's attention maps under reduced-precision weights (multilingual).
ATTENTION_LIMIT_REDUCED = 0.05


def run_output_check(t3, runner, conds_t3, *, steps: int, tolerance: float, cfg_weight=0.5,
                     precision: str = "float32") -> CheckResult:
    """Teacher-forced logits of the runner (through its installed step) against the untouched
    model's forward over the same prompt and tokens."""
    if getattr(t3, "is_gpt", False):  # Turbo: no CFG, GPT-2's own forward as the reference
        from .t3.turbo import turbo_reference_logits

        t3_cond, text, forced = probe_inputs(t3, conds_t3, steps, 0.0)
        embeds, len_cond = runner.build_prompt(t3_cond, text[:1])
        ref = turbo_reference_logits(t3, embeds, forced)
        return compare(runner.teacher_forced_logits(embeds, len_cond, forced), ref, tolerance, precision)
    t3_cond, text, forced = probe_inputs(t3, conds_t3, steps, cfg_weight)
    embeds = runner.build_prompt(t3_cond, text, cfg_weight)
    ref = reference_logits(t3, embeds, forced, cfg_weight).float()
    maps = {}
    if runner.heads:  # multilingual: the step is always eager, and the maps come with its logits
        fast = runner.teacher_forced_logits(embeds, forced, cfg_weight, maps).float()
    else:  # through the installed step, the code generate() runs
        fast = runner.step_forced_logits(embeds, forced, cfg_weight).float()
    result = compare(fast, ref, tolerance, precision)
    if runner.heads:  # multilingual: the analyzer's attention maps must match eager attention too
        ref_maps = reference_attention_maps(t3, embeds, forced, runner.heads)
        diff = max((maps[layer] - ref_maps[layer]).abs().max().item() for layer in ref_maps)
        limit = tolerance if precision == "float32" else ATTENTION_LIMIT_REDUCED
        result = dataclasses.replace(result, attention_diff=diff,
                                     passed=result.passed and diff <= limit)
    return result


def compare(fast: torch.Tensor, ref: torch.Tensor, tolerance: float, precision: str = "float32") -> CheckResult:
    """Judge fast vs reference logits (steps, V): max relative difference against `tolerance`
    for float32 weights; argmax agreement and mean KL against PRECISION_LIMITS otherwise."""
    diff = (fast - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    same = fast.argmax(-1) == ref.argmax(-1)  # (steps,)
    agree = same.float().mean().item()
    finite = bool(torch.isfinite(fast).all())
    rel = diff / scale if finite else float("inf")
    kl = kl_per_step(ref, fast) if finite else torch.full((ref.shape[0],), float("inf"))
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) >= DECISIVE_MARGIN
    n_decisive = int(decisive.sum())
    decisive_agreement = int((same & decisive).sum()) / n_decisive if n_decisive else 1.0
    limits = PRECISION_LIMITS.get(precision)
    if limits is None:
        passed = finite and rel <= tolerance
    else:
        passed = finite and decisive_agreement >= limits.argmax and kl.mean().item() <= limits.kl_mean
    return CheckResult(passed=passed, max_abs_diff=diff, rel_diff=rel, tolerance=tolerance,
                       argmax_agreement=agree, steps=ref.shape[0], kl_mean=kl.mean().item(),
                       kl_max=kl.max().item(), decisive_agreement=decisive_agreement,
                       decisive_steps=n_decisive, precision=precision, limits=limits)


def kl_per_step(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per row, in nats."""
    ref_logp = torch.log_softmax(ref_logits.double(), -1)
    logp = torch.log_softmax(logits.double(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).float()

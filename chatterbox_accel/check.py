"""The output check: patched vs original T3 on a teacher-forced probe, same weights.

The probe is deterministic: fixed text, the model's built-in voice (or a fixed synthetic one),
and a fixed sequence of forced speech tokens. The reference is the original HF `LlamaModel`
forward over the whole probe sequence, read exactly as `T3.inference` reads it
(`hidden_states[-1]` -> `speech_head` -> CFG combine). The fast path decodes the same tokens
step by step through its KV cache. They must agree within `tolerance`, measured as
max |fast - reference| / max |reference| over all steps and the whole vocabulary.

With reduced-precision T3 weights (`precision=` bfloat16 / int8 / int4, or a GPU's bf16/fp16
compute) the logits cannot agree to rounding level, so such a mode is judged by what sampling
sees (`PRECISION_LIMITS`): the distribution each step samples from, after the CFG combine and
upstream's processors with generate()'s defaults (repetition penalty 1.2 over BOS and the ids so
far, temperature 0.8, min_p 0.05, top_p 1.0), compared with float32's by total variation
TV = 1/2 sum |p - q|, which is the probability that the mode's draw differs from float32's under
the best coupling of the two (one shared random number per step does about as well); and the
argmax on decisive steps (float32's top-2 logits at least DECISIVE_MARGIN apart). KL of the raw
logits is reported beside them, not judged: on flat logits it is tiny by construction and on
peaked ones it weighs tokens that min_p removes before any draw.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .t3.sampling import SamplingParams, cfg_combine, process_logits

DECISIVE_MARGIN = 1.0  # a step is decisive when float32's top-2 logits differ by at least this
SAMPLING = dict(temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)  # generate()'s defaults


@dataclass(frozen=True)
class PrecisionLimits:
    """Pass bounds of the output check for a reduced-precision T3, on what sampling sees."""

    argmax: float   # least fraction of DECISIVE probe steps whose argmax agrees with float32
    tv_mean: float  # largest mean per-step total variation of the sampling distribution
    tv_max: float   # largest single-step total variation


# Why these values (the same on every device; not measured on a checkpoint and padded):
# - tv_mean 0.1: on average at most one draw in ten may differ from float32's under a shared
#   random number. Sampling itself is far noisier: two float32 draws of the realistic
#   checkpoint (2 nats) differ 43-56 % of the time (1 - sum p^2, reported as `collision`), so
#   this is a small fraction of the variation every generation already has.
# - tv_max 0.35: no single step may move more than about a third of its probability mass: a step
#   whose favourite changes outright (TV ~0.5 or more) is a changed sound, not rounding.
# - argmax 0.9: where float32 has a clear favourite (a decisive step), the mode keeps it in nine
#   steps of ten; greedy decoding and low temperatures follow the argmax.
GATE = PrecisionLimits(argmax=0.9, tv_mean=0.1, tv_max=0.35)
PRECISION_LIMITS = {"bfloat16": GATE, "float16": GATE, "int8": GATE, "int4": GATE}

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
    tv_mean: float = 0.0  # mean per-step total variation of the sampling distributions
    tv_max: float = 0.0
    collision: float = 0.0  # mean 1 - sum p^2 of float32's: how often two of its own draws differ
    decisive_agreement: float = 1.0  # argmax agreement over steps with a top-2 gap >= DECISIVE_MARGIN
    decisive_steps: int = 0
    precision: str = "float32"  # T3 weight format checked; reduced ones are judged by `limits`
    limits: PrecisionLimits | None = None

    def __str__(self):
        verdict = "passed" if self.passed else "FAILED"
        maps = "" if self.attention_diff is None else (
            f", alignment attention max|dp| {self.attention_diff:.3g}")
        judged = (f"tolerance {self.tolerance:.3g}" if self.limits is None else
                  f"{self.precision}: limits decisive argmax >= {self.limits.argmax:.0%}, "
                  f"sampling TV mean <= {self.limits.tv_mean:g}, max <= {self.limits.tv_max:g}")
        return (f"output check {verdict}: max|dlogit| {self.max_abs_diff:.3g} "
                f"(relative {self.rel_diff:.3g}, {judged}){maps}, "
                f"argmax agreement {self.argmax_agreement:.0%} over {self.steps} steps "
                f"({self.decisive_agreement:.0%} over {self.decisive_steps} decisive), "
                f"sampling TV mean {self.tv_mean:.3g} / max {self.tv_max:.3g} "
                f"(float32's own draws differ {self.collision:.0%}), KL mean {self.kl_mean:.3g} / max {self.kl_max:.3g}")


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
        return compare(runner.teacher_forced_logits(embeds, len_cond, forced), ref, tolerance, precision,
                       forced, t3.hp.start_speech_token)
    t3_cond, text, forced = probe_inputs(t3, conds_t3, steps, cfg_weight)
    embeds = runner.build_prompt(t3_cond, text, cfg_weight)
    ref = reference_logits(t3, embeds, forced, cfg_weight).float()
    maps = {}
    if runner.heads:  # multilingual: the step is always eager, and the maps come with its logits
        fast = runner.teacher_forced_logits(embeds, forced, cfg_weight, maps).float()
    else:  # through the installed step, the code generate() runs
        fast = runner.step_forced_logits(embeds, forced, cfg_weight).float()
    result = compare(fast, ref, tolerance, precision, forced, t3.hp.start_speech_token)
    if runner.heads:  # multilingual: the analyzer's attention maps must match eager attention too
        ref_maps = reference_attention_maps(t3, embeds, forced, runner.heads)
        diff = max((maps[layer] - ref_maps[layer]).abs().max().item() for layer in ref_maps)
        limit = tolerance if precision == "float32" else ATTENTION_LIMIT_REDUCED
        result = dataclasses.replace(result, attention_diff=diff,
                                     passed=result.passed and diff <= limit)
    return result


def sampling_probs(logits: torch.Tensor, forced: torch.Tensor | None, bos: int) -> torch.Tensor:
    """(steps, V) CFG-combined logits -> the distributions sampling draws from at each step:
    upstream's processors with generate()'s defaults (SAMPLING), the repetition penalty over BOS
    and the forced ids before that step (none when `forced` is None)."""
    steps, V = logits.shape
    presence = torch.zeros(steps, V, dtype=torch.bool)
    presence[:, bos % V] = True
    if forced is not None:
        for i, token in enumerate(forced.view(-1)[: steps - 1].tolist()):
            presence[i + 1 :, token] = True
    params = SamplingParams.make("cpu", cfg_weight=0.0, **SAMPLING)
    scores = process_logits(logits.detach().float().cpu(), presence, params)
    return torch.softmax(scores.double(), dim=-1)


def compare(fast: torch.Tensor, ref: torch.Tensor, tolerance: float, precision: str = "float32",
            forced: torch.Tensor | None = None, bos: int = 6561) -> CheckResult:
    """Judge fast vs reference logits (steps, V): max relative difference against `tolerance`
    for float32 weights; against PRECISION_LIMITS otherwise (decisive argmax agreement, total
    variation of the sampling distributions; `forced`: the probe's tokens, for the penalty)."""
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
    ref_p = sampling_probs(ref, forced, bos)
    tv = 0.5 * (sampling_probs(fast, forced, bos) - ref_p).abs().sum(-1) if finite else torch.ones(ref.shape[0])
    collision = float((1 - (ref_p ** 2).sum(-1)).mean())
    limits = PRECISION_LIMITS.get(precision)
    if limits is None:
        passed = finite and rel <= tolerance
    else:
        passed = (finite and decisive_agreement >= limits.argmax and tv.mean().item() <= limits.tv_mean
                  and tv.max().item() <= limits.tv_max)
    return CheckResult(passed=passed, max_abs_diff=diff, rel_diff=rel, tolerance=tolerance,
                       argmax_agreement=agree, steps=ref.shape[0], kl_mean=kl.mean().item(),
                       kl_max=kl.max().item(), decisive_agreement=decisive_agreement,
                       decisive_steps=n_decisive, precision=precision, limits=limits,
                       tv_mean=tv.mean().item(), tv_max=tv.max().item(), collision=collision)


def kl_per_step(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per row, in nats."""
    ref_logp = torch.log_softmax(ref_logits.double(), -1)
    logp = torch.log_softmax(logits.double(), -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).float()

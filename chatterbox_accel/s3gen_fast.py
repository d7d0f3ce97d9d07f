"""S3Gen fast modes: output-changing levers on the flow's CFM, each opt-in and checked.

S3Gen's flow is ~half of `generate()` on a CPU and compute-bound there; its full attention
over the voice prompt leaves no exact shortcut (see s3gen.py). The levers below change the
audio, so each is off by default, and `install` measures the change on a probe:
- `steps` (upstream's `n_cfm_timesteps`): at most this many Euler steps of the CFM (upstream:
  10; Turbo's meanflow decoder: 2; never more than upstream's). Time scales with the steps.
- `cfg=False`: the CFM without classifier-free guidance: the conditional row only, so every
  estimator call runs half the batch (upstream: rows cond/uncond, dxdt = 1.7 cond - 0.7 uncond).
  Meanflow (Turbo) has no CFG; there it does nothing.
- `prompt_seconds`: S3Gen re-reads at most this much of the reference (its last seconds;
  upstream: up to 10 s) on every call; estimator time grows with prompt + new frames.
- `dtype="bfloat16"`: the estimator under autocast (bf16 matmuls: AMX / AVX512-BF16 on CPUs,
  tensor cores on GPUs); its output is cast back. HiFT stays float32.

Under a prompt cap the CFM's noise is drawn for the uncut length and the dropped frames' part
discarded, so the new frames get the exact path's noise and the cap's effect is the prompt's.
Each is a wrapt patch of the model's own S3Gen objects (decoder.forward, decoder.solve_euler,
flow.inference, estimator.forward), reverted by `restore()`. The stream's incremental S3Gen
reads the same settings (`S3GenModes.steps_for`, `.cap`) and goes through the same patched
solver and estimator. `install` returns the probe's mel deviation from the exact path, which
the caller judges against `MEL_LIMIT`.
"""
from __future__ import annotations

import contextvars
import inspect
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TOKENS_PER_SECOND = 25  # S3 speech tokens; the flow makes `token_mel_ratio` (2) mel frames each
MEL_LIMIT = 0.5  # largest probe mel relative L2 vs the exact path a mode bundle may have (see README)
PROBE_TOKENS = 50  # 2 s of new speech on the probe


@dataclass(frozen=True)
class S3GenModes:
    steps: int | None = None          # CFM Euler steps (None: upstream's)
    cfg: bool = True                  # classifier-free guidance in the CFM
    prompt_seconds: float | None = None  # cap on the reference S3Gen re-reads
    dtype: str = "float32"            # estimator compute dtype

    @property
    def active(self) -> bool:
        return self != S3GenModes()

    def names(self) -> list[str]:
        out = []
        if self.steps is not None:
            out.append(f"s3gen.steps={self.steps}")
        if not self.cfg:
            out.append("s3gen.cfg=off")
        if self.prompt_seconds is not None:
            out.append(f"s3gen.prompt_seconds={self.prompt_seconds:g}")
        if self.dtype != "float32":
            out.append(f"s3gen.{self.dtype}")
        return out

    def steps_for(self, default: int) -> int:
        """Steps for a solver whose upstream count is `default`: a fast mode only ever lowers it."""
        return min(self.steps, default) if self.steps is not None else default

    def cap(self, ref: dict) -> dict:
        """The reference dict with its prompt cut to the last `prompt_seconds` (tokens and the
        matching mel frames), or as it is."""
        if self.prompt_seconds is None:
            return ref
        tokens = ref["prompt_token"]
        keep = int(round(self.prompt_seconds * TOKENS_PER_SECOND))
        if tokens.shape[1] <= keep:
            return ref
        feat = ref["prompt_feat"]
        ratio = max(1, feat.shape[1] // max(1, tokens.shape[1]))
        out = dict(ref)
        out["prompt_token"] = tokens[:, -keep:]
        out["prompt_feat"] = feat[:, -keep * ratio:]
        if ref.get("prompt_token_len") is not None:
            out["prompt_token_len"] = torch.full_like(torch.as_tensor(ref["prompt_token_len"]), keep)
        if ref.get("prompt_feat_len") is not None:
            out["prompt_feat_len"] = torch.full_like(torch.as_tensor(ref["prompt_feat_len"]), keep * ratio)
        return out


# ---- the patches ------------------------------------------------------------------------------
# Prompt frames the cap dropped in the flow call now running (read by the decoder's forward).
_DROPPED: contextvars.ContextVar[int] = contextvars.ContextVar("chatterbox_accel_dropped_frames", default=0)


def _decoder_forward(modes: S3GenModes):
    """decoder.forward(mu, mask, n_timesteps, ...): n_timesteps lowered to `modes.steps`; under a
    prompt cap, the noise drawn as the exact path draws it (see `cfm_forward`)."""
    def wrapper(wrapped, instance, args, kwargs):
        bound = inspect.signature(wrapped).bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call["n_timesteps"] = modes.steps_for(call["n_timesteps"])
        dropped = _DROPPED.get()
        if dropped:
            return cfm_forward(instance, dropped=dropped, **call)
        return wrapped(**call)
    return wrapper


@torch.inference_mode()
def cfm_forward(cfm, mu, mask, n_timesteps, temperature=1.0, spks=None, cond=None, noised_mels=None,
                meanflow=False, dropped: int = 0):
    """`CausalConditionalCFM.forward` (chatterbox 0.1.7) for a prompt cut by `dropped` mel frames:
    the noise is drawn for the uncut length and its first `dropped` frames discarded, so each
    remaining frame (the new speech above all) gets the noise the exact path gives it, and the
    cap's effect is the prompt's alone. (`randn_like(mu)` draws a (B, 80, T) tensor row-major.)"""
    B, C, T = mu.shape
    z = torch.randn(B, C, T + dropped, dtype=mu.dtype, device=mu.device)[..., dropped:].contiguous()
    if noised_mels is not None:
        z[..., mu.size(2) - noised_mels.size(2):] = noised_mels
    t_span = torch.linspace(0, 1, n_timesteps + 1, device=mu.device, dtype=mu.dtype)
    if not meanflow and cfm.t_scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    if meanflow:
        return cfm.basic_euler(z, t_span=t_span, mu=mu, mask=mask, spks=spks, cond=cond), None
    return cfm.solve_euler(z, t_span=t_span, mu=mu, mask=mask, spks=spks, cond=cond, meanflow=meanflow), None


def _prompt_cap(modes: S3GenModes):
    """flow.inference(token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, ...):
    the prompt arguments cut by `modes.cap`."""
    def wrapper(wrapped, instance, args, kwargs):
        bound = inspect.signature(wrapped).bind(*args, **kwargs)
        names = ("prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len")
        before = bound.arguments["prompt_feat"].shape[1]
        bound.arguments.update(modes.cap({k: bound.arguments.get(k) for k in names}))
        token = _DROPPED.set(before - bound.arguments["prompt_feat"].shape[1])
        try:
            return wrapped(*bound.args, **bound.kwargs)
        finally:
            _DROPPED.reset(token)
    return wrapper


def solve_euler_no_cfg(cfm, x, t_span, mu, mask, spks, cond, meanflow=False):
    """`ConditionalCFM.solve_euler` (chatterbox 0.1.7) with the conditional row only: the same
    Euler steps, dxdt = estimator(cond row) instead of the CFG mix of a doubled batch."""
    from chatterbox.models.s3gen.flow_matching import cast_all

    in_dtype = x.dtype
    x, t_span, mu, mask, spks, cond = cast_all(x, t_span, mu, mask, spks, cond, dtype=cfm.estimator.dtype)
    B = mu.size(0)
    for t, r in zip(t_span[:-1], t_span[1:]):
        t, r = t.unsqueeze(0).expand(B), r.unsqueeze(0)
        dxdt = cfm.estimator.forward(x=x, mask=mask, mu=mu, t=t, spks=spks, cond=cond,
                                     r=r.expand(B) if meanflow else None)
        x = x + (r - t[:1]) * dxdt
    return x.to(in_dtype)


def _no_cfg(wrapped, instance, args, kwargs):
    return solve_euler_no_cfg(instance, *args, **kwargs)


def _autocast(dtype: torch.dtype):
    def wrapper(wrapped, instance, args, kwargs):
        ref = kwargs.get("x", args[0] if args else None)
        device = ref.device.type if isinstance(ref, torch.Tensor) else "cpu"
        with torch.autocast(device_type=device, dtype=dtype):
            out = wrapped(*args, **kwargs)
        return out.to(ref.dtype) if isinstance(ref, torch.Tensor) else out
    return wrapper


def install(model, registry, modes: S3GenModes) -> None:
    """Patch the model's S3Gen for `modes` (each active lever a wrapt patch in `registry`)."""
    flow = model.s3gen.flow
    cfm = flow.decoder
    meanflow = bool(getattr(model.s3gen, "meanflow", False))
    if modes.steps is not None or modes.prompt_seconds is not None:
        registry.wrap_method(cfm, "forward", _decoder_forward(modes))
    if not modes.cfg and not meanflow:
        registry.wrap_method(cfm, "solve_euler", _no_cfg)
    if modes.prompt_seconds is not None:
        registry.wrap_method(flow, "inference", _prompt_cap(modes))
    if modes.dtype != "float32":
        registry.wrap_method(cfm.estimator, "forward", _autocast(getattr(torch, modes.dtype)))
    registry.state["s3gen_modes"] = modes


def modes_of(model) -> S3GenModes:
    from .patching import get_registry

    registry = get_registry(model)
    return (registry.state.get("s3gen_modes") if registry is not None else None) or S3GenModes()


# ---- the probe --------------------------------------------------------------------------------
@dataclass
class MelCheck:
    passed: bool
    rel_l2: float         # ||mel - exact|| / ||exact|| over the new frames
    cosine: float         # cosine similarity of the log-mel matrices
    seconds_exact: float
    seconds_fast: float
    limit: float
    modes: str

    def __str__(self):
        verdict = "passed" if self.passed else "FAILED"
        return (f"S3Gen mode check {verdict} ({self.modes}): mel relative L2 {self.rel_l2:.3f} (limit "
                f"{self.limit:g}), log-mel cosine {self.cosine:.4f}; probe {self.seconds_exact:.2f} s exact, "
                f"{self.seconds_fast:.2f} s with the modes")


def probe_ref(ref: dict, modes: S3GenModes) -> dict:
    """The model's reference (its S3Gen ref dict), cut to what the probe needs: the cap plus 1 s
    (so the cap shows), at most 3 s, to keep the exact pass short."""
    seconds = min(3.0, (modes.prompt_seconds or 2.0) + 1.0)
    return S3GenModes(prompt_seconds=seconds).cap(ref)


def mel_probe(model, ref: dict, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(mel, seconds) of `tokens` (default: PROBE_TOKENS fixed speech tokens) through
    `s3gen.flow_inference` and whatever is installed on it, noise seed 0, the global RNG left as it was."""
    import time

    device = model.s3gen.device
    if tokens is None:
        tokens = ((torch.arange(PROBE_TOKENS) * 797 + 11) % 6561)[None]
    tokens = tokens.to(device)
    # manual_seed seeds every device's generator: fork them all (CPU and the model's CUDA
    # device), so the caller's CUDA RNG is left as it was too.
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        start = time.perf_counter()
        mel = model.s3gen.flow_inference(tokens, ref_dict=ref, finalize=True)
        return mel.float(), time.perf_counter() - start


def compare_mels(mel: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    n = min(mel.shape[-1], exact.shape[-1])
    a, b = mel[..., :n].flatten().double(), exact[..., :n].flatten().double()
    rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return rel, cos

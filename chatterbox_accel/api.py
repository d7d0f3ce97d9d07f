"""`accelerate(model, **options)` and `restore(model)`: the public entry points.

accelerate: validate the model -> build the fast T3 runner -> pick attention, compile/graphs
(with warm-up and fallback) -> wrap `model.t3.inference` -> output check. Any exception or a
failed check reverts every patch, so a model is never left half-patched.
"""
from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch

from .check import CheckResult, probe_inputs, run_output_check
from . import versions
from .config import AccelConfig
from .engine import BATCH_FAMILIES, generate_batch
from .families import family_of, t3_fallback_reason, voice_method_of
from .patching import drop_registry, get_registry
from .precision import checked_runner, select_kernels
from .stream import generate_stream, stream_unsupported
from .t3.decode import T3Runner
from .t3.graphs import install_step
from .t3.model import make_flash_attention, sdpa_attention
from .t3.patch import FastInference
from .voice import CachedPrepareConditionals, CachedSetTargetVoice, VoiceCache

logger = logging.getLogger(__name__)

SUPPORTED_DEVICES = ("cpu", "cuda", "mps")
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OutputCheckError(RuntimeError):
    """The accelerated output did not match the original; the model was restored."""


@dataclass
class AccelReport:
    """What `accelerate()` did: applied optimizations, fallbacks with reasons, check, time."""

    applied: list = field(default_factory=list)
    fallbacks: dict = field(default_factory=dict)
    check: CheckResult | None = None
    seconds: float = 0.0
    device: str = ""
    restored: bool = False  # True when the check failed and every patch was reverted
    versions: dict = field(default_factory=dict)  # untested package versions installed ({name: version})
    kernels: object = None  # kernels.Selection: what was measured and chosen for T3's products (CPU)
    s3gen_check: object = None  # s3gen_fast.MelCheck: the S3Gen fast modes' probe against the exact path
    runtime: list = field(default_factory=list)  # run-time fallbacks since accelerate(), as they happen
    attention: str = ""  # the CPU decode attention's measurement (or why it is not used)
    s3gen_kernel: str = ""  # the S3Gen oneDNN products' measurement and probe (s3gen_kernels.py)
    refused: list = field(default_factory=list)  # reduced-precision kernels the check refused: (name, CheckResult)

    @property
    def ok(self) -> bool:
        return not self.restored

    def __str__(self):
        lines = [f"chatterbox_accel on {self.device}: {len(self.applied)} optimization(s) "
                 f"in {self.seconds:.1f} s"]
        lines += [f"  applied   {name}" for name in self.applied]
        lines += [f"  fallback  {name}: {why}" for name, why in self.fallbacks.items()]
        if self.versions:
            lines.append(f"  untested  {', '.join(f'{k} {v}' for k, v in self.versions.items())} "
                         f"(tested: chatterbox-tts 0.1.7, torch 2.6 / 2.11, transformers 5.2.0)")
        if self.kernels is not None:
            lines.append(f"  kernels   {self.kernels.describe()}")
        if self.attention:
            lines.append(f"  attention {self.attention}")
        if self.s3gen_kernel:
            lines.append(f"  s3gen     {self.s3gen_kernel}")
        if self.check is not None:
            lines.append(f"  {self.check}")
        if self.s3gen_check is not None:
            lines.append(f"  {self.s3gen_check}")
        lines += [f"  run time  {event}" for event in self.runtime]
        if self.restored:
            lines.append("  model restored to the original code (output check failed)")
        return "\n".join(lines)


def accelerate(model, config: AccelConfig | None = None, **options) -> AccelReport:
    """Patch a live Chatterbox model for speed; verify the output; return a report.

    `options` are `AccelConfig` fields (see README). Calling it again re-applies with the new
    options. With `strict=True` a failed output check raises `OutputCheckError`.
    """
    cfg = config if config is not None else AccelConfig.from_options(options)
    if config is not None and options:
        raise ValueError("pass either config= or keyword options, not both")
    t3 = _validate_model(model, cfg)  # None for ChatterboxVC, which has no T3
    restore(model)  # idempotent: re-accelerating starts from the original
    start = time.perf_counter()
    report = AccelReport(device=str(_model_device(model)))
    registry = get_registry(model, create=True)
    try:
        voice_method = voice_method_of(model)  # prepare_conditionals, or VC's set_target_voice
        if cfg.voice_cache and voice_method is not None:
            cache = registry.state["voice_cache"] = VoiceCache(cfg.voice_cache_size)
            wrapper = CachedSetTargetVoice if voice_method == "set_target_voice" else CachedPrepareConditionals
            registry.wrap_method(model, voice_method, wrapper(cache))
            report.applied.append("voice_cache")
        report.versions = versions.untested()
        t3_fallback = t3_fallback_reason(model)  # VC: see families.py
        if not t3_fallback and not cfg.check:  # another chatterbox-tts: only a checked loop may run
            why = versions.chatterbox_reason("the fast T3 loop")
            t3_fallback = why and f"{why}; it runs only when the output check verifies it (check=True)"
        if cfg.t3 and t3_fallback:
            report.fallbacks["t3"] = t3_fallback
        if cfg.t3 and not t3_fallback:
            _accelerate_t3(model, t3, cfg, report, registry)
        if cfg.compiles_s3gen(str(_model_device(model).type)):
            from .s3gen import compile_estimator

            why = compile_estimator(model, registry, mode=cfg.compile_mode, tolerance=cfg.resolved_tolerance())
            if why is None:
                report.applied.append("s3gen.compile")
            else:
                report.fallbacks["s3gen.compile"] = why
        if cfg.s3gen_kernel != "plain" and getattr(model, "s3gen", None) is not None:
            from .s3gen_kernels import install as install_s3gen_kernels, install_batch_gate

            if cfg.s3gen_kernel == "batch":  # the default: only for generate_batch (VC has none)
                if family_of(model) in BATCH_FAMILIES and install_batch_gate(model, registry) is None:
                    report.applied.append("s3gen.kernel.batch")
                    report.s3gen_kernel = ("generate_batch's flow on oneDNN-packed products where faster: "
                                           "packed, timed and probed at its first batched flow call")
            else:
                installed, note = install_s3gen_kernels(model, registry, cfg.s3gen_kernel)
                if installed:
                    report.applied.append("s3gen.kernel.onednn")
                    report.s3gen_kernel = note
                else:
                    report.fallbacks["s3gen.kernel"] = note
        s3gen_device = str(_model_device(model).type)
        if cfg.s3gen_dtype == "auto" and cfg.resolved_s3gen_dtype(s3gen_device) == "float32":
            report.fallbacks["s3gen.dtype"] = ("s3gen_dtype='auto': float32, since this device has no native "
                                               "bfloat16 (CPU: no avx512_bf16 or amx_bf16), where bf16 would be "
                                               "emulated and slower")
        if cfg.s3gen_modes_on(s3gen_device).active:
            why = None if cfg.check else versions.chatterbox_reason("the S3Gen fast modes")
            if why:
                report.fallbacks["s3gen.modes"] = f"{why}; they run only behind their probe (check=True)"
            else:
                _install_s3gen_modes(model, cfg, report, registry)
        if family_of(model) in BATCH_FAMILIES and callable(getattr(model, "generate", None)):
            _attach(model, registry, report, "generate_batch", generate_batch)
        if stream_unsupported(model) is None:
            _attach(model, registry, report, "generate_stream", generate_stream)
    except BaseException:
        restore(model)
        raise
    report.seconds = time.perf_counter() - start
    runner = registry.state.get("t3_runner")
    if runner is not None and hasattr(runner, "events"):
        report.runtime = runner.events  # the runner's own list: later fallbacks show up here
    registry.state["report"] = report
    if report.check is not None and not report.check.passed:
        restore(model)
        report.restored = True
        message = f"chatterbox_accel: {report.check}; every patch was reverted."
        if cfg.strict:
            raise OutputCheckError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    logger.info("%s", report)
    return report


def _accelerate_t3(model, t3, cfg: AccelConfig, report: AccelReport, registry) -> None:
    """Any family's T3: its runner (Llama or GPT-2, as the T3 itself says), the decode step
    (compile / CUDA graphs, tried on a warm-up), the CPU kernels, the output check through the
    installed step (a reduced precision that fails it falls back one kernel, then to the exact
    fast path: precision.py), then the wrapper of the T3 method generate() calls."""
    def build(config: AccelConfig):
        runner = _build_runner(t3, config, report)
        _install_steps(runner, t3, config, report)
        select_kernels(runner, config, report, compiled=runner.step != runner.slot_logits)
        return runner

    def check(runner, precision: str):
        return run_output_check(t3, runner, _builtin_t3_conds(model), steps=cfg.check_steps,
                                tolerance=_check_tolerance(cfg, runner), precision=precision)

    runner, report.check = checked_runner(t3, cfg, report, build, check)
    fast = runner.wrapper(runner)
    registry.state["t3_runner"], registry.state["t3_inference"] = runner, fast
    registry.wrap_method(t3, fast.method.split(".")[-1], fast)
    report.applied.append("t3.static_kv_cache" if cfg.static_cache else "t3.kv_cache")
    report.applied.append("t3.device_sampler")


def _attach(model, registry, report, name: str, fn) -> None:
    """`model.<name>` = `fn` bound to the model, on a tested chatterbox-tts only: these entry
    points mirror upstream's pipeline step by step, which no probe verifies on another version."""
    why = versions.chatterbox_reason(name)
    if why:
        report.fallbacks[name] = f"{why}; no probe verifies it, so it is not attached"
    else:
        registry.set_attr(model, name, functools.partial(fn, model))
        report.applied.append(name)


def restore(model) -> None:
    """Revert every patch `accelerate()` made to `model`. A no-op on a model never accelerated."""
    drop_registry(model)


def is_accelerated(model) -> bool:
    registry = get_registry(model)
    return registry is not None and len(registry) > 0


def fast_inference_of(model) -> FastInference | None:
    """The fast `T3.inference` wrapper installed on `model`, if any."""
    registry = get_registry(model)
    return None if registry is None else registry.state.get("t3_inference")


def report_of(model) -> AccelReport | None:
    """The report of the model's accelerate(), its run-time fallbacks up to date."""
    registry = get_registry(model)
    return None if registry is None else registry.state.get("report")


def runner_of(model) -> T3Runner | None:
    registry = get_registry(model)
    return None if registry is None else registry.state.get("t3_runner")


# ---- helpers --------------------------------------------------------------------------------
def _validate_model(model, cfg: AccelConfig):
    """The model's T3 (None for ChatterboxVC), after checking everything accelerate() needs."""
    from chatterbox.models.t3 import T3

    if family_of(model) == "vc":
        device = _model_device(model)
        if device.type not in SUPPORTED_DEVICES:
            raise ValueError(f"device {device.type!r} is not supported; use one of {SUPPORTED_DEVICES}")
        if cfg.dtype != "float32" and device.type == "cpu":
            raise ValueError(f"dtype={cfg.dtype!r} needs a GPU; on cpu use dtype='float32'")
        return None
    t3 = getattr(model, "t3", None)
    if not isinstance(t3, T3):
        raise TypeError(
            f"accelerate() expects a Chatterbox model with a .t3 (ChatterboxTTS, "
            f"ChatterboxMultilingualTTS, ChatterboxTurboTTS) or a ChatterboxVC, got {type(model).__name__}"
        )
    if t3.training:
        raise ValueError("model.t3 is in training mode; call model.t3.eval() before accelerate()")
    device = t3.device
    if device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"device {device.type!r} is not supported; use one of {SUPPORTED_DEVICES}")
    weight_dtype = t3.speech_head.weight.dtype
    if weight_dtype not in DTYPE_BY_NAME.values():
        raise ValueError(f"T3 weights have dtype {weight_dtype}; expected float32, bfloat16 or float16")
    if cfg.dtype != "float32" and device.type == "cpu":
        raise ValueError(f"dtype={cfg.dtype!r} needs a GPU; on cpu use dtype='float32'")
    return t3


def _compute_dtype(cfg: AccelConfig, device_type: str, weight_dtype=torch.float32) -> str:
    """T3's compute dtype: `dtype`, or bfloat16 when precision="bfloat16" asks for it on a GPU
    (on a CPU that precision is a weight format of the kernel table instead). A T3 loaded in
    bf16/fp16 computes in its own dtype unless `dtype` names another: no float32 copy of it."""
    if cfg.precision == "bfloat16" and device_type != "cpu":
        return "bfloat16"
    if cfg.dtype == "float32" and weight_dtype != torch.float32 and cfg.precision == "float32":
        return {torch.bfloat16: "bfloat16", torch.float16: "float16"}[weight_dtype]
    return cfg.dtype


def _check_tolerance(cfg: AccelConfig, runner) -> float:
    """The output check's tolerance: the option, else float32's for a runner computing in float32
    (the exact fallback of a GPU's bf16 included) and the reduced one for a T3 computing in its
    own bf16/fp16 (which the original also runs in)."""
    if cfg.check_tolerance is not None:
        return float(cfg.check_tolerance)
    return 1e-3 if runner.backbone.dtype == torch.float32 else 5e-2


def _build_runner(t3, cfg: AccelConfig, report: AccelReport):
    """T3Runner (Llama: English, Multilingual) or TurboRunner (GPT-2), by the T3 itself."""
    device_type = t3.device.type
    name = _compute_dtype(cfg, device_type, t3.speech_head.weight.dtype)
    dtype = DTYPE_BY_NAME[name]
    if dtype != torch.float32:
        report.applied.append(f"t3.{name}")
    attention = _select_attention(cfg, device_type, dtype, report, t3)
    eos_every = cfg.eos_check_every if cfg.eos_check_every is not None else (
        1 if device_type == "cpu" else 16)  # a CPU "sync" is free; a wasted CPU step is not
    if getattr(t3, "is_gpt", False):
        from .t3.turbo import TurboRunner

        return TurboRunner(t3, attention=attention, dtype=dtype, sync_every=eos_every,
                           static_cache=cfg.static_cache)
    return T3Runner(t3, attention=attention, dtype=dtype, sync_every=eos_every,
                    kv_bucket=kv_bucket_for(cfg, device_type), static_cache=cfg.static_cache)


def kv_bucket_for(cfg: AccelConfig, device_type: str) -> int:
    """How far attention reads the cache past the newest position (rounded up to this), whatever
    the step: on CUDA `kv_bucket`, one captured graph per bucket (a compiled step too: automatic
    dynamic shapes compile one bucket-agnostic step, and warm-up captures every bucket); on a
    CPU 32, little more than is filled."""
    return cfg.kv_bucket if device_type == "cuda" else 32


def _select_attention(cfg, device_type, dtype, report, t3):
    if cfg.attention in ("auto", "flash"):
        usable = device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        flash = make_flash_attention() if usable else None
        if flash is not None:
            report.applied.append("t3.attention.flash")
            return flash
        if cfg.attention == "flash":
            why = "flash-attn not installed" if usable else "flash-attn needs CUDA and bf16/fp16"
            report.fallbacks["t3.attention.flash"] = why + "; using SDPA"
    if cfg.attention in ("auto", "native"):
        native = _native_attention(cfg, device_type, dtype, report, t3)
        if native is not None:
            report.applied.append("t3.attention.native")
            return native
    report.applied.append("t3.attention.sdpa")
    return sdpa_attention


def _native_attention(cfg, device_type, dtype, report, t3):
    """The CPU decode-attention kernel (t3/cpu_attention.py) where it builds, checks and, under
    "auto", measures faster than SDPA; None (with the reason reported) otherwise."""
    if device_type != "cpu" or dtype != torch.float32 or cfg.compiles_t3(device_type):
        if cfg.attention == "native":
            report.fallbacks["t3.attention.native"] = (
                "the native decode attention is for float32 on a CPU without torch.compile; using SDPA")
        return None
    from .t3 import cpu_attention

    tcfg = t3.tfmr.config
    heads = tcfg.num_attention_heads
    try:
        attention, report.attention = cpu_attention.select(heads, tcfg.hidden_size // heads,
                                                           measure_first=cfg.attention == "auto")
    except cpu_attention.Unavailable as e:
        report.attention = str(e)
        report.fallbacks["t3.attention.native"] = f"{e}; using SDPA"
        return None
    return attention  # None: measured slower, SDPA's by choice (the note says so; not a fallback)


def _install_steps(runner, t3, cfg: AccelConfig, report: AccelReport):
    device_type = t3.device.type
    compile_step = cfg.compiles_t3(device_type)
    graphs = cfg.wants_cuda_graphs(device_type)
    if cfg.cuda_graphs and not graphs:
        report.fallbacks["t3.cuda_graphs"] = f"CUDA graphs need a CUDA device, model is on {device_type}"
    if getattr(t3, "is_gpt", False) and (compile_step or graphs):
        report.fallbacks["t3.step"] = ("Turbo: torch.compile / CUDA graphs of the GPT-2 step are not "
                                       "built yet; the step runs eagerly")
        return
    if runner.heads and (compile_step or graphs):
        report.fallbacks["t3.step"] = ("multilingual: the alignment analyzer runs host code between "
                                       "each step's forward and its sampling, so the step stays eager")
        return
    if not (compile_step or graphs):
        return
    result = install_step(runner, compile_step=compile_step, mode=cfg.compile_mode,
                          cuda_graphs=graphs, warmup=lambda: _warmup(runner, t3))
    report.applied += result["applied"]
    report.fallbacks.update(result["fallbacks"])


def _install_s3gen_modes(model, cfg: AccelConfig, report: AccelReport, registry) -> None:
    """The S3Gen fast modes (s3gen_fast.py), after a probe measured their mel deviation from the
    exact path within MEL_LIMIT; over it, they are refused with the figures (the rest stays)."""
    from .patching import PatchRegistry
    from .s3gen_fast import MEL_LIMIT, MelCheck, compare_mels, install, mel_probe, probe_ref

    modes = cfg.s3gen_modes_on(str(_model_device(model).type))
    names = ", ".join(modes.names())
    voice = getattr(getattr(model, "conds", None), "gen", None) or getattr(model, "ref_dict", None)  # VC: ref_dict
    if cfg.check and voice is None:
        report.fallbacks["s3gen.modes"] = ("no reference voice on the model to probe the modes with (set one "
                                           "first, or pass check=False); S3Gen runs exact")
        return
    if cfg.check:
        ref = probe_ref(voice, modes)
        exact, t_exact = mel_probe(model, ref)
        trial = PatchRegistry()
        try:
            install(model, trial, modes)
            fast, t_fast = mel_probe(model, ref)
        finally:
            trial.revert()
        rel, cos = compare_mels(fast, exact)
        passed = bool(torch.isfinite(fast).all()) and rel <= MEL_LIMIT
        report.s3gen_check = MelCheck(passed, rel, cos, t_exact, t_fast, MEL_LIMIT, names)
        if not passed:
            report.fallbacks["s3gen.modes"] = f"{report.s3gen_check}; S3Gen runs exact"
            return
    install(model, registry, modes)
    report.applied += modes.names()


GENERATE_MAX_NEW_TOKENS = 1000  # what generate() asks T3 for (English, Multilingual)
WARMUP_PROMPT_MARGIN = 256      # prompt positions a real call may have beyond the probe's


def _warmup(runner: T3Runner, t3, steps: int = 4):
    """A few real decode steps through `runner.step` (compiles / captures, or raises), on the
    cache a real generate() call uses: allocated now for its 1000 new tokens after a prompt
    up to WARMUP_PROMPT_MARGIN longer than the probe's, so the first real call neither
    regrows the cache nor recompiles. CUDA graphs: every kv bucket of the one-slot decoder is
    captured now (`runner.warm`), largest first, not in the middle of a request."""
    t3_cond, text, _ = probe_inputs(t3, None, 1)
    options = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
    request = runner.request(t3_cond, text, options, steps)
    runner.warm(1, request.prompt_len + GENERATE_MAX_NEW_TOKENS + WARMUP_PROMPT_MARGIN)
    runner.generate(request)


def _model_device(model) -> torch.device:
    t3 = getattr(model, "t3", None)
    if t3 is not None:
        return t3.device
    return next(model.s3gen.parameters()).device  # ChatterboxVC


def _builtin_t3_conds(model):
    conds = getattr(model, "conds", None)
    return getattr(conds, "t3", None)

"""AccelConfig: every switch of `accelerate()`, validated.

Unknown option names and bad values raise `ValueError` naming the option and the
allowed values, so a typo never silently turns an optimization off.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "native")
COMPILE_TARGETS = ("t3", "s3gen")  # s3gen: the flow's CFM estimator, opt-in (see s3gen.py)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class AccelConfig:
    """Options of `chatterbox_accel.accelerate(model, **options)`."""

    # Use the fast T3 decode loop (static KV cache, fused device-side sampler).
    t3: bool = True
    # Preallocate the KV cache once and reuse it across calls (False: allocate per call).
    static_cache: bool = True
    # Attention kernel: "auto" = flash-attn when installed and usable (CUDA, bf16/fp16); on a CPU
    # in float32 the project's decode-attention kernel (t3/cpu_attention.py: built here with the
    # C compiler, used where it measures faster than SDPA); else SDPA. "native" = that kernel
    # without measuring; "sdpa" = always SDPA.
    attention: str = "auto"
    # torch.compile the decode step. None = on for CUDA, off elsewhere (it costs minutes of
    # compile time on a CPU for little gain; the step is memory-bound there).
    compile: bool | None = None
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs) or "max-autotune".
    compile_mode: str = "default"
    # Which parts torch.compile may touch: "t3" (the decode step) and "s3gen" (the flow's CFM
    # estimator; opt-in: not measured to help on a CPU, not measured on a GPU yet).
    compile_targets: tuple = ("t3",)
    # Capture the decode step in CUDA graphs (one per KV-length bucket). None = on for CUDA.
    cuda_graphs: bool | None = None
    # CUDA (English): attention reads the KV cache up to the next multiple of this past the newest
    # position, compiled or not; one CUDA graph per bucket, all captured at warm-up. A CPU reads in
    # steps of 32; Turbo's eager GPT-2 step reads what is filled.
    kv_bucket: int = 256
    # Read the decoder's sampled ids (each row's EOS) on the host every this many steps (one
    # device sync per read; admissions wait for one). None = every step on CPU (a sync is free
    # there, a wasted step is not), 16 on GPUs. Multilingual reads every step (its analyzer).
    eos_check_every: int | None = None
    # CPU: T3's products run on the kernel measured fastest on this machine at accelerate()
    # (t3/kernels.py). False: never the oneDNN-packed candidate (it keeps one more fp32 copy of
    # the weights: ~2 GB for English/Multilingual, ~1.2 GB for Turbo).
    cpu_prepack: bool = True
    # CPU: "auto" (measure the candidates, use the fastest) or a kernel name to pin without
    # measuring: float32 "plain" | "gemv" | "onednn"; bfloat16 "onednn-bf16" | "bf16";
    # int8 "fbgemm-int8" | "int8pack"; int4 "int4pack".
    cpu_kernel: str = "auto"
    # T3 weight format: "float32" (exact), or "bfloat16" / "int8" / "int4" (private reduced copies
    # of the projection and speech-head weights; CPU. On a GPU, "bfloat16" means dtype bfloat16).
    # The output check then judges argmax agreement and KL against float32 (check.py).
    precision: str = "float32"
    # T3 compute dtype: "float32" (exact parity) or "bfloat16"/"float16" (GPU, faster).
    dtype: str = "float32"
    # Cache prepare_conditionals per reference audio (by content hash); reused by generate().
    voice_cache: bool = True
    # How many reference voices the cache keeps (least recently used ones are dropped).
    voice_cache_size: int = 16
    # CPU: S3Gen's products (every nn.Linear of its flow) on oneDNN-prepacked float32 weights
    # (s3gen_kernels.py), which differ from F.linear by float32 rounding only. "batch" = inside
    # generate_batch's flow calls, where they measure faster here (generate() and the stream keep
    # F.linear: upstream's audio bit for bit); "onednn" = everywhere; "auto" = everywhere, where
    # faster; "plain" = never.
    s3gen_kernel: str = "batch"
    # S3Gen fast modes (s3gen_fast.py; each changes the audio, each off by default):
    # CFM Euler steps (None: upstream's 10, Turbo's meanflow 2).
    s3gen_steps: int | None = None
    # Classifier-free guidance inside the CFM (False: the conditional row only, half the work).
    s3gen_cfg: bool = True
    # Cap, in seconds, on the reference prompt S3Gen re-reads every call (its last seconds; None:
    # upstream's, up to 10 s).
    s3gen_prompt_seconds: float | None = None
    # The CFM estimator's compute dtype: "float32" or "bfloat16" (autocast; HiFT stays float32).
    s3gen_dtype: str = "float32"
    # A named bundle of options: "exact" (nothing that changes the output) or "fast" (see
    # PRESETS). Explicit options override the preset's; applied by `from_options`.
    preset: str = "exact"
    # Run the output check (original vs patched on a teacher-forced probe) after patching.
    check: bool = True
    # Teacher-forced probe length of the output check, in speech tokens.
    check_steps: int = 8
    # Largest allowed |logit difference| of the output check, relative to max |logit|.
    # None = 1e-3 for float32, 5e-2 for reduced precision.
    check_tolerance: float | None = None
    # Raise instead of warning when the output check fails (the model is restored either way).
    strict: bool = False

    def __post_init__(self):
        _choice("attention", self.attention, ATTENTION_BACKENDS)
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        _choice("dtype", self.dtype, DTYPES)
        from .t3.kernels import PRECISIONS, candidates  # here, not at import: importing the package loads no torch

        _choice("precision", self.precision, PRECISIONS)
        _choice("s3gen_dtype", self.s3gen_dtype, ("float32", "bfloat16", "auto"))
        _choice("s3gen_kernel", self.s3gen_kernel, ("batch", "plain", "onednn", "auto"))
        _choice("preset", self.preset, tuple(PRESETS))
        bundle = PRESETS[self.preset]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if bundle and all(getattr(self, k) == defaults[k] != v for k, v in bundle.items()):
            raise ValueError(f"AccelConfig(preset={self.preset!r}) built directly does not apply the preset's "
                             f"options; use accelerate(model, preset={self.preset!r}) or "
                             f"AccelConfig.from_options(preset={self.preset!r})")
        if self.s3gen_steps is not None:
            _positive_int("s3gen_steps", self.s3gen_steps)
        _bool("s3gen_cfg", self.s3gen_cfg)
        if self.s3gen_prompt_seconds is not None and not (
            isinstance(self.s3gen_prompt_seconds, (int, float)) and not isinstance(self.s3gen_prompt_seconds, bool)
            and self.s3gen_prompt_seconds >= 1.0
        ):
            raise ValueError(f"option s3gen_prompt_seconds={self.s3gen_prompt_seconds!r} must be a number "
                             f">= 1.0 (seconds of the reference) or None")
        kernels = ["auto"] + candidates(self.precision)
        if self.cpu_kernel not in kernels:
            raise ValueError(f"option cpu_kernel={self.cpu_kernel!r} is not valid with precision="
                             f"{self.precision!r}; allowed values: {kernels}")
        if isinstance(self.compile_targets, str):
            self.compile_targets = (self.compile_targets,)
        self.compile_targets = tuple(self.compile_targets)
        for target in self.compile_targets:
            _choice("compile_targets", target, COMPILE_TARGETS)
        for name in ("t3", "static_cache", "cpu_prepack", "voice_cache", "check", "strict"):
            _bool(name, getattr(self, name))
        for name in ("compile", "cuda_graphs"):
            if getattr(self, name) is not None:
                _bool(name, getattr(self, name))
        _positive_int("kv_bucket", self.kv_bucket)
        _positive_int("voice_cache_size", self.voice_cache_size)
        if self.eos_check_every is not None:
            _positive_int("eos_check_every", self.eos_check_every)
        _positive_int("check_steps", self.check_steps)
        if self.check_tolerance is not None and not (
            isinstance(self.check_tolerance, (int, float)) and self.check_tolerance > 0
        ):
            raise ValueError(f"check_tolerance must be a positive number or None, got {self.check_tolerance!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, **kwargs) -> "AccelConfig":
        """Build a config from a dict and/or keyword options; unknown names raise."""
        merged = {**(options or {}), **kwargs}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown}; allowed options are: {sorted(known)}"
            )
        preset = merged.get("preset", "exact")
        _choice("preset", preset, tuple(PRESETS))
        return cls(**{**PRESETS[preset], **merged})

    @property
    def s3gen_modes(self):
        """The S3Gen modes asked for (`s3gen_dtype="auto"` counted as bfloat16; see modes_on)."""
        return self.s3gen_modes_on("cuda")

    def s3gen_modes_on(self, device_type: str):
        """The S3Gen modes for a device: `s3gen_dtype="auto"` is bfloat16 where the device computes
        it natively (CUDA; CPUs with AVX512-BF16 or AMX-BF16), float32 elsewhere: emulated bf16
        on an AVX2 CPU made the estimator ~2x slower, the opposite of what a fast preset is for."""
        from .s3gen_fast import S3GenModes

        return S3GenModes(steps=self.s3gen_steps, cfg=self.s3gen_cfg, prompt_seconds=self.s3gen_prompt_seconds,
                          dtype=self.resolved_s3gen_dtype(device_type))

    def resolved_s3gen_dtype(self, device_type: str) -> str:
        if self.s3gen_dtype != "auto":
            return self.s3gen_dtype
        return "bfloat16" if native_bf16(device_type) else "float32"

    def resolved_tolerance(self) -> float:
        if self.check_tolerance is not None:
            return float(self.check_tolerance)
        return 1e-3 if self.dtype == "float32" else 5e-2

    def wants_compile(self, device_type: str) -> bool:
        return self.compile if self.compile is not None else device_type == "cuda"

    def compiles_t3(self, device_type: str) -> bool:
        return self.wants_compile(device_type) and "t3" in self.compile_targets

    def compiles_s3gen(self, device_type: str) -> bool:
        """Only when asked for by name: compile_targets including "s3gen", and compile not False."""
        return "s3gen" in self.compile_targets and self.compile is not False

    def wants_cuda_graphs(self, device_type: str) -> bool:
        wanted = self.cuda_graphs if self.cuda_graphs is not None else device_type == "cuda"
        return wanted and device_type == "cuda"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named option bundles. "fast": chosen by measurement on random full-size weights on a 2-core
# Intel Xeon (AMX), see README "Presets"; every part of it changes the output and is checked.
PRESETS = {
    "exact": {},
    "fast": {"precision": "int8", "s3gen_steps": 5, "s3gen_cfg": False, "s3gen_dtype": "auto"},
}


def native_bf16(device_type: str) -> bool:
    """Does the device compute bfloat16 natively (not emulated in float32)?"""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    from .t3.kernels import cpu_features

    return bool({"avx512_bf16", "amx_bf16"} & cpu_features())


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"option {name}={value!r} is not valid; allowed values: {list(allowed)}")


def _bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"option {name}={value!r} must be True or False")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"option {name}={value!r} must be a positive integer")


__all__ = ["AccelConfig", "COMPILE_MODES", "ATTENTION_BACKENDS"]

"""S3Gen's matrix products on a CPU through oneDNN on prepacked weights: opt-in, measured, checked.

S3Gen's flow is about half of `generate()` on a CPU, the CFM estimator ~95 % of it, and ~60 % of
the estimator is `nn.Linear` products over its CFG pair's frames (600 rows for a 3 s voice and
3 s of speech). torch's CPU `F.linear` runs them on MKL's sgemm; on the 2-core AMD EPYC (Zen 5)
measured, oneDNN on weights prepacked for it (t3/kernels.py's `onednn`, the op Inductor emits)
took 43 ms where F.linear took 95 ms over a 65 MB sample of the flow's weights at 600 rows (the
report's line under s3gen_kernel="auto"), and the whole flow 4.0 s instead of 6.0 s. Its
products differ from F.linear's by float32 rounding (~1e-6 relative), so the audio is no longer
upstream's bit for bit, which `generate()` promises by default: the kernel is off unless asked
for (`s3gen_kernel="onednn"`, or "auto": measure both on the flow's own weights at 600 rows and
use oneDNN only if it is faster).

Every `nn.Linear` of `s3gen.flow` (encoder and estimator) gets an instance-level wrapt patch of
its `forward` (reverted by `restore()`), so `generate()`'s upstream S3Gen, `generate_batch` and
the stream all run through it. Products of 16 rows or fewer, non-float32 inputs, inputs that
need a gradient and products under autocast (`s3gen_dtype="bfloat16"`) keep `F.linear`. Each
prepacked copy stands for its weight as it was; a weight changed later is repacked before use
(t3/kernels.py `KernelTable`). Installing checks one product against F.linear and the whole
estimator against its plain self on a probe; a failure at run time switches the table off (the
products go back to F.linear) and shows in the report.
"""
from __future__ import annotations

import contextlib
import time

import torch
import wrapt

from .patching import shadowed
from .t3.kernels import KernelTable, sample_modules

ROWS = 600           # the estimator's rows at a 3 s voice + 3 s of speech, CFG pair
SAMPLE_BYTES = 64e6  # fp32 weight bytes timed per kernel
TOLERANCE = 1e-4     # the estimator probe: max |onednn - plain| / max |plain|


def flow_linears(model) -> list:
    flow = model.s3gen.flow
    return [m for m in flow.modules() if isinstance(m, torch.nn.Linear)]


class LinearThroughTable:
    """wrapt wrapper for an `nn.Linear.forward`: the table's product where it answers."""

    def __init__(self, table: KernelTable, registry):
        self.table, self.registry = table, registry
        self.reported = False

    def __call__(self, wrapped, instance, args, kwargs):
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        if (len(args) + len(kwargs) != 1 or not isinstance(x, torch.Tensor) or x.dtype != torch.float32
                or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)
                or torch.is_autocast_enabled("cpu")):  # s3gen_dtype="bfloat16": F.linear autocasts
            return wrapped(*args, **kwargs)
        out = self.table(instance, x)
        if out is None:
            if self.table.disabled is not None and not self.reported:
                self.reported = True
                report = self.registry.state.get("report")
                if report is not None:
                    report.runtime.append(f"s3gen.kernel.onednn failed ({self.table.disabled}); "
                                          "S3Gen's products run on F.linear from now on")
            return wrapped(*args, **kwargs)
        return out


def time_products(modules, table: KernelTable | None, rows: int = ROWS, reps: int = 3) -> float:
    """Best seconds per pass over `modules` at `rows` rows: through `table`, or F.linear."""
    g = torch.Generator().manual_seed(0)
    xs = {m.in_features: torch.randn(rows, m.in_features, generator=g) for m in modules}
    best = float("inf")
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first pass warms up
            start = time.perf_counter()
            for m in modules:
                out = table(m, xs[m.in_features]) if table is not None else None
                if out is None:
                    torch.nn.functional.linear(xs[m.in_features], m.weight, m.bias)
            if rep:
                best = min(best, time.perf_counter() - start)
    return best


def install(model, registry, kernel: str) -> tuple[bool, str]:
    """(installed, note). `kernel`: "onednn" (no timing) or "auto" (time plain vs onednn)."""
    from .s3gen import estimator_of, probe_args

    modules = flow_linears(model)
    if not modules:
        return False, "no nn.Linear in S3Gen's flow"
    if next(model.s3gen.parameters()).device.type != "cpu":
        return False, "s3gen_kernel is for S3Gen on a CPU (on a GPU F.linear is cuBLAS)"
    try:
        table = KernelTable(modules, "plain", "onednn", rows=ROWS)  # prepares and checks the copies
    except Exception as exc:  # oneDNN missing from this torch build, a copy refused, ...
        return False, f"oneDNN packing failed here ({type(exc).__name__}: {exc}); S3Gen runs F.linear"
    note = f"oneDNN-packed copies {table.nbytes / 2**20:.0f} MB"
    if kernel == "auto":
        sample = sample_modules(modules, SAMPLE_BYTES)
        plain, packed = time_products(sample, None), time_products(sample, table)
        note = (f"{ROWS}-row products per {sum(m.weight.numel() for m in sample) * 4 / 1e6:.0f} MB sample: "
                f"F.linear {plain * 1e3:.1f} ms, oneDNN {packed * 1e3:.1f} ms; " + note)
        if table.disabled is not None or not packed < plain:
            return False, f"oneDNN not faster here ({note}); S3Gen runs F.linear"
    wrapper = LinearThroughTable(table, registry)
    estimator = estimator_of(model)
    if estimator is not None:  # the whole estimator, on the copies, against its plain self
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            probe = probe_args(estimator)
            want = estimator(**probe)
            for m in modules:
                stack.enter_context(shadowed(m, "forward", wrapt.FunctionWrapper(m.forward, wrapper)))
            got = estimator(**probe)
        diff = (got - want).abs().max().item()
        scale = max(want.abs().max().item(), 1e-12)
        if table.disabled is not None or not diff <= TOLERANCE * scale:
            why = table.disabled or f"max|d| {diff:.3g}, max|out| {scale:.3g}"
            return False, (f"the oneDNN S3Gen estimator disagrees with F.linear's on a probe ({why}); "
                           "S3Gen runs F.linear")
        note += f"; estimator probe max|d|/max|out| {diff / scale:.1e}"
    for m in modules:
        registry.wrap_method(m, "forward", wrapper)
    registry.state["s3gen_kernels"] = table
    return True, note

"""S3Gen's matrix products on a CPU through oneDNN on prepacked weights: measured, checked, and by
default only inside `generate_batch`'s flow.

S3Gen's flow is about half of `generate()` on a CPU, the CFM estimator ~95 % of it, and ~60 % of
the estimator is `nn.Linear` products over its CFG pair's frames (600 rows for a 3 s voice and
3 s of speech). torch's CPU `F.linear` runs them on MKL's sgemm; on the 2-core AMD EPYC (Zen 5)
measured, oneDNN on weights prepacked for it (t3/kernels.py's `onednn`, the op Inductor emits)
took 43 ms where F.linear took 95 ms over a 65 MB sample of the flow's weights at 600 rows (the
report's line under s3gen_kernel="auto"), and the whole flow 4.0 s instead of 6.0 s. Its
products differ from F.linear's by float32 rounding (~1e-6 relative), so the audio is no longer
upstream's bit for bit, which `generate()` promises by default. So by default
(`s3gen_kernel="batch"`) the kernel runs only inside `generate_batch`'s flow calls, whose rows are
promised equal to a row synthesized alone within a tolerance, not bit for bit (each row is
computed under its batch's padding and masks): `generate()` and the stream keep F.linear, and the
copies (~375 MB for English's flow) are packed, timed at the engine's 1200-row calls and probed at
the first batched flow call (or `reserve_batch()`), so a model that never batches keeps none.
`s3gen_kernel="onednn"` uses it everywhere; "auto" everywhere where it measures faster (600 rows);
"plain" never.

Every `nn.Linear` of `s3gen.flow` (encoder and estimator) gets an instance-level wrapt patch of
its `forward` (reverted by `restore()`): with "onednn"/"auto" the products of `generate()`'s
upstream S3Gen, `generate_batch` and the stream all run through it; with "batch" it is a gate
(`BatchGate`) open only inside `batch_products()`. Products of 16 rows or fewer, non-float32 inputs, inputs that
need a gradient and products under autocast (`s3gen_dtype="bfloat16"`) keep `F.linear`. Each
prepacked copy stands for its weight as it was; a weight changed later is repacked before use
(t3/kernels.py `KernelTable`). Installing checks one product against F.linear and the whole
estimator against its plain self on a probe; a failure at run time switches the table off (the
products go back to F.linear) and shows in the report.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time

import torch
import wrapt

from .patching import shadowed, state_of
from .t3.kernels import KernelTable, sample_modules

ROWS = 600           # the estimator's rows at a 3 s voice + 3 s of speech, CFG pair
BATCH_ROWS = 1200    # the same in generate_batch's CPU flow calls (two utterances: engine.CPU_FLOW_GROUP)
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


def unavailable(model) -> str | None:
    """Why the packed products cannot apply to this model's flow, or None."""
    if not flow_linears(model):
        return "no nn.Linear in S3Gen's flow"
    if next(model.s3gen.parameters()).device.type != "cpu":
        return "s3gen_kernel is for S3Gen on a CPU (on a GPU F.linear is cuBLAS)"
    return None


def prepare(model, registry, kernel: str, rows: int = ROWS) -> tuple[LinearThroughTable | None, str]:
    """(wrapper, note): the wrapt wrapper running S3Gen's products on the packed copies, or None
    and why not. `kernel`: "onednn" (no timing) or "auto" (time plain vs onednn at `rows`)."""
    from .s3gen import estimator_of, probe_args

    why = unavailable(model)
    if why:
        return None, why
    modules = flow_linears(model)
    try:
        table = KernelTable(modules, "plain", "onednn", rows=rows)  # prepares and checks the copies
    except Exception as exc:  # oneDNN missing from this torch build, a copy refused, ...
        return None, f"oneDNN packing failed here ({type(exc).__name__}: {exc}); S3Gen runs F.linear"
    note = f"oneDNN-packed copies {table.nbytes / 2**20:.0f} MB"
    if kernel == "auto":
        sample = sample_modules(modules, SAMPLE_BYTES)
        plain, packed = time_products(sample, None, rows=rows), time_products(sample, table, rows=rows)
        note = (f"{rows}-row products per {sum(m.weight.numel() for m in sample) * 4 / 1e6:.0f} MB sample: "
                f"F.linear {plain * 1e3:.1f} ms, oneDNN {packed * 1e3:.1f} ms; " + note)
        if table.disabled is not None or not packed < plain:
            return None, f"oneDNN not faster here ({note}); S3Gen runs F.linear"
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
            return None, (f"the oneDNN S3Gen estimator disagrees with F.linear's on a probe ({why}); "
                          "S3Gen runs F.linear")
        note += f"; estimator probe max|d|/max|out| {diff / scale:.1e}"
    return wrapper, note


def install(model, registry, kernel: str) -> tuple[bool, str]:
    """(installed, note): every product of the flow on the copies ("onednn" or "auto")."""
    wrapper, note = prepare(model, registry, kernel)
    if wrapper is None:
        return False, note
    for m in flow_linears(model):
        registry.wrap_method(m, "forward", wrapper)
    registry.state["s3gen_kernels"] = wrapper.table
    return True, note


_BATCH = contextvars.ContextVar("chatterbox_accel_s3gen_batch", default=None)


class BatchGate:
    """s3gen_kernel="batch": the wrapt wrapper of every flow `nn.Linear.forward`, passing each
    product to F.linear except inside `batch_products()` of its model, where the packed copies
    answer once `prepare()` has packed, timed and probed them (and found them faster). The gate
    is a context variable, so a `generate()` in another thread keeps F.linear meanwhile."""

    def __init__(self, model, registry):
        self.model, self.registry = model, registry
        self.wrapper: LinearThroughTable | None = None
        self.note: str | None = None  # set once prepared: the measurement, or why not
        self.lock = threading.Lock()

    def prepare(self) -> None:
        with self.lock:
            if self.note is not None:
                return
            try:
                self.wrapper, note = prepare(self.model, self.registry, "auto", BATCH_ROWS)
            except Exception as exc:  # never fail a batch over a faster kernel
                self.wrapper, note = None, f"preparing it failed ({type(exc).__name__}: {exc}); S3Gen runs F.linear"
            self.note = note
            report = self.registry.state.get("report")
            if self.wrapper is not None:
                self.registry.state["s3gen_kernels"] = self.wrapper.table
                if report is not None:
                    report.s3gen_kernel = f"generate_batch's flow: {note}"
            elif report is not None:
                report.s3gen_kernel = ""
                report.fallbacks["s3gen.kernel"] = f"generate_batch's flow: {note}"

    def __call__(self, wrapped, instance, args, kwargs):
        if self.wrapper is not None and _BATCH.get() is self:
            return self.wrapper(wrapped, instance, args, kwargs)
        return wrapped(*args, **kwargs)


def install_batch_gate(model, registry) -> str | None:
    """Install the gate (s3gen_kernel="batch"); None, or why it does not apply here."""
    why = unavailable(model)
    if why:
        return why
    gate = registry.state["s3gen_batch_gate"] = BatchGate(model, registry)
    for m in flow_linears(model):
        registry.wrap_method(m, "forward", gate)
    return None


def prepare_batch(model) -> None:
    """Pack, time and probe the batch kernels now (reserve_batch: at a service's start)."""
    gate = state_of(model, "s3gen_batch_gate")
    if gate is not None:
        gate.prepare()


@contextlib.contextmanager
def batch_products(model):
    """generate_batch's flow calls: the packed products, where the model's gate has them."""
    gate = state_of(model, "s3gen_batch_gate")
    if gate is None:
        yield
        return
    gate.prepare()
    token = _BATCH.set(gate)
    try:
        yield
    finally:
        _BATCH.reset(token)

"""What `accelerate()` installs for T3's products and weight format, and the gate it passes.

- `select_kernels`: on a CPU, time the candidate kernels of the asked-for precision on the
  model's own weights and run T3's products on the fastest (t3/kernels.py); a reduced precision
  with no kernel faster than plain float32 is refused (float32 is then selected).
- `checked_runner`: build the runner, run the output check through its installed step, and where
  a reduced precision (a CPU weight format, or a GPU's bf16/fp16 compute) fails the check's gate
  (check.py: what sampling sees), fall back one step at a time: the next kernel of that precision
  that measured faster than exact, then the exact fast path. Asking for more speed never costs
  the exact fast path: only `strict=True` makes a refused precision an error. The report lists
  what runs in `applied` (never a refused item), each refused kernel with its figures in
  `fallbacks["t3.precision"]` and `refused`.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)


def installed_precision(runner, t3=None) -> str:
    """The weight format T3's decode products actually run in, against the model's own: a CPU
    kernel table's format, or a reduced compute dtype the runner casts a float32 T3 to (a GPU's
    dtype="bfloat16"), which the check judges by the same gate as the CPU's bf16 weights. A T3
    loaded in bf16 that computes in bf16 is judged against itself, by tolerance."""
    table = runner.backbone.kernels
    if table is not None and table.kernel is not None:
        return table.decode.precision
    own = t3.speech_head.weight.dtype if t3 is not None else runner.backbone.dtype
    computes = runner.backbone.dtype
    if computes != own and computes in (torch.bfloat16, torch.float16):
        return {torch.bfloat16: "bfloat16", torch.float16: "float16"}[computes]
    return "float32"


def checked_runner(t3, cfg, report, build, check):
    """(runner, CheckResult or None): `build(cfg)` makes a runner with its step and kernels
    installed (appending to the report); `check(runner, precision)` runs the output check."""
    start = len(report.applied)
    runner = build(cfg)
    if not cfg.check:
        return runner, None
    precision = installed_precision(runner, t3)
    result = check(runner, precision)
    if result.passed or precision == "float32" or cfg.strict:
        return runner, result
    refused = [(_kernel_name(runner, report, precision), result)]
    selection = report.kernels
    if selection is not None and selection.precision == precision and not selection.pinned:
        for name in selection.alternatives():
            chosen = selection.with_decode(name)
            try:
                runner.use_kernels(chosen.decode, chosen.prefill)
            except Exception as exc:  # a copy refused here: not a candidate after all
                logger.info("chatterbox_accel: %s kernel not usable (%s)", name, exc)
                continue
            result = check(runner, precision)
            if result.passed:
                report.kernels = chosen
                _record(report, refused, f"{name} runs")
                return runner, result
            refused.append((name, result))
    del report.applied[start:]  # what the reduced build applied no longer runs
    report.kernels = None
    exact = dataclasses.replace(cfg, precision="float32", dtype="float32", cpu_kernel="auto")
    runner = build(exact)
    result = check(runner, installed_precision(runner, t3))
    _record(report, refused, "T3 runs the exact fast path (float32)")
    return runner, result


def _kernel_name(runner, report, precision: str) -> str:
    table = runner.backbone.kernels
    if table is not None and table.kernel is not None:
        return table.decode.name
    return f"{precision} compute"


def _record(report, refused: list, outcome: str) -> None:
    report.refused += refused
    parts = "; ".join(f"{name} refused by the output check ({result.precision}: decisive argmax "
                      f"{result.decisive_agreement:.0%}, sampling TV mean {result.tv_mean:.3g} / max "
                      f"{result.tv_max:.3g})" for name, result in refused)
    note = f"{parts}; {outcome}"
    previous = report.fallbacks.get("t3.precision")
    report.fallbacks["t3.precision"] = f"{previous}; {note}" if previous else note
    logger.warning("chatterbox_accel: %s", note)


def select_kernels(runner, cfg, report, compiled: bool) -> None:
    """CPU: time the candidate kernels of `cfg.precision` on the model's own weights and run T3's
    products on the fastest (t3/kernels.py); a reduced precision with no kernel faster than plain
    float32 is refused (float32 is then selected). Off the CPU, or when it fails, the plain kernels."""
    from .t3.kernels import KernelRefused, select

    backbone = runner.backbone
    if backbone.device.type != "cpu":
        if cfg.precision in ("int8", "int4"):
            report.fallbacks["t3.precision"] = (f"precision={cfg.precision!r} is CPU-only so far (not measured "
                                                f"on a GPU, where T3 at batch 1-2 is launch-bound); T3 stays "
                                                f"{cfg.dtype}")
        return
    why = None
    if backbone.dtype != torch.float32:
        why = f"the kernel table takes float32 T3 weights (T3 runs in {backbone.dtype})"
    elif compiled:
        why = "the decode step is compiled: torch.compile traces the plain kernels"
    if why is not None:
        if cfg.precision != "float32":
            report.fallbacks["t3.precision"] = f"{why}; T3 stays {cfg.dtype}"
        report.fallbacks["t3.cpu_kernels"] = f"{why}; T3 uses the plain kernels"
        return
    exact_allowed = None if cfg.cpu_prepack else ("plain", "gemv")  # cpu_prepack=False: never onednn
    pinned = None if cfg.cpu_kernel == "auto" else cfg.cpu_kernel
    modules = runner.product_modules()
    try:
        try:
            selection = select(modules, backbone.plain, cfg.precision, rows=runner.decode_rows, pinned=pinned,
                               allowed=exact_allowed if cfg.precision == "float32" else None,
                               exact_allowed=exact_allowed)
        except KernelRefused as exc:
            report.fallbacks["t3.precision"] = f"{exc}; T3 stays float32"
            selection = select(modules, backbone.plain, "float32", rows=runner.decode_rows, allowed=exact_allowed)
        table = runner.use_kernels(selection.decode, selection.prefill, selection.single or None)
    except Exception as exc:  # an op missing from this torch build, a kernel refused, ...
        runner.backbone.kernels = None
        report.fallbacks["t3.cpu_kernels"] = f"{type(exc).__name__}: {exc}; T3 uses the plain kernels"
        return
    report.kernels = selection
    report.applied.append("t3.cpu_kernels")
    if selection.precision != "float32":
        report.applied.append(f"t3.precision.{selection.precision}")
    logger.info("chatterbox_accel: T3 kernels %s; %.2f GiB of private weight copies",
                selection.describe(), table.nbytes / 2**30)

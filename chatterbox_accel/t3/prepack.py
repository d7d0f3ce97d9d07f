"""CPU decode: T3's weights prepacked once into oneDNN's blocked layout.

A decode step multiplies the CFG batch (1 or 2 rows) by every weight of the transformer, so on a
CPU it is bound by how fast the weights stream from memory, not by arithmetic. Measured on the
2-core EPYC with `python scripts/bench_linear.py` (torch 2.6.0, fp32, 120 distinct 4096x1024
weights = 2 GB, one pass each; two runs):

    rows   F.linear (MKL)   W @ x^T (model.linear)   oneDNN, weight prepacked
    1      108-111 ms          112-114 ms                 62-72 ms
    2      201-248 ms          102-124 ms                 73-75 ms

At the prefill's row counts the packed weights are faster up to ~200 rows and even at 400
(GFLOP/s, 24 such weights, two runs):

    rows        16       32       68      204      400
    MKL       41-46    51-82   69-105  123-126  136-137
    oneDNN   105-118  128-140  132-157  153-168  131-152

So the runner keeps a packed copy of each weight T3 multiplies (attention and MLP projections,
the speech head) and runs every product through `torch.ops.mkldnn._linear_pointwise`, the op
Inductor itself emits for packed CPU linears.

- Same fp32 math; the blocked accumulation differs from MKL's at rounding level (the runner's
  output check compares the result with the original, as for every other fast path).
- Costs memory: one more copy of those weights (~2 GB for English/Multilingual T3, ~1.2 GB for
  Turbo's GPT-2). `accelerate(model, cpu_prepack=False)` turns it off.
- The model's own parameters are never touched. A weight changed after packing (in place, or a
  new Parameter) is seen through its version counter / identity and repacked before use.
- A packing or run-time failure switches packing off (logged, with the reason) and the step
  goes on with the plain kernels.
"""
from __future__ import annotations

import logging
import platform

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MEASURED_MACHINES = ("x86_64", "amd64")  # where the gain above was measured; elsewhere plain kernels


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _weight_of(module) -> torch.Tensor:
    """The (out, in) weight, as nn.Linear stores it; transformers' GPT-2 Conv1D (it has `nf`)
    stores (in, out)."""
    return module.weight.t() if hasattr(module, "nf") else module.weight


def project(packed, module, x: torch.Tensor, plain):
    """`module`'s product with x: on its packed copy when `packed` (a PackedLinears, or None)
    has one and packing is on, else `plain(module, x)`."""
    out = packed(module, x) if packed is not None else None
    return out if out is not None else plain(module, x)


class PackedLinears:
    """Packed copies of nn.Linear / Conv1D weights, keyed by module."""

    def __init__(self, modules, rows: int = 2):
        self.rows = rows
        self.disabled: str | None = None
        self.entries = {}
        for module in modules:
            self.entries[module] = self._entry(module)
        self._verify(next(iter(self.entries)))

    def _entry(self, module):
        param = module.weight
        return param, param._version, _pack(_weight_of(module), self.rows)

    def _verify(self, module) -> None:
        """One packed product against F.linear: a kernel that is broken or numerically off on
        this machine is refused here rather than found by the output check."""
        weight = _weight_of(module)
        x = torch.randn(self.rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        want = F.linear(x.double(), weight.double()).float()
        got = _packed_linear(x, self.entries[module][2], None)
        scale = want.abs().max().clamp_min(1e-6)
        if got.shape != want.shape or not torch.isfinite(got).all() or (got - want).abs().max() > 1e-4 * scale:
            raise RuntimeError("oneDNN's packed linear disagrees with F.linear on this machine")

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p, _, _ in self.entries.values())

    def __call__(self, module, x: torch.Tensor):
        """The packed product `x @ W^T + b` for `module`, or None when the plain kernel should
        answer (not packed, or packing switched off)."""
        entry = self.entries.get(module)
        if entry is None or self.disabled is not None:
            return None
        try:
            param, version, packed = entry
            if module.weight is not param or param._version != version:  # changed since packing
                param, version, packed = self.entries[module] = self._entry(module)
            return _packed_linear(x, packed, module.bias)
        except Exception as exc:  # keep decoding on the plain kernels
            self.disabled = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: packed CPU linear failed (%s); using the plain kernels",
                           self.disabled)
            return None


def unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why packing cannot apply to a T3 on the CPU (None when it can)."""
    if dtype != torch.float32:
        return f"float32 only (T3 runs in {dtype})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    machine = platform.machine().lower()
    if machine not in MEASURED_MACHINES:
        return f"measured faster on x86-64 CPUs only, not on {machine or 'this CPU'}"
    return None

"""T3's matrix products on the CPU: candidate kernels and weight formats, chosen by measurement.

A decode step multiplies the CFG batch (1-2 rows) by every weight of the transformer, so on a
CPU it is bound by how fast the weights stream from memory; which kernel streams them fastest
depends on the machine. Measured with `python scripts/bench_linear.py` (torch 2.6.0, fp32, 2 rows,
ms per pass over 2 GB of 4096x1024 weights):

    CPU                               F.linear (MKL)   W @ x^T   oneDNN packed
    2-core AMD EPYC (AVX2)                  201-248    102-124           73-75
    2-core Intel Xeon (AVX-512, AMX)             83        139              87

So nothing is assumed: at `accelerate()` each candidate is timed on a sample of the model's own
weights at the decode row count and at a prefill size (`select`), and the fastest is used.
`plain` (`F.linear`, the original's own kernel) is always a candidate, so the exact path never
installs a kernel slower than the original's over the measured cost (`decode_cost`: a single
request's pass plus a 16-row batch's pass; at the single request's rows alone a kernel chosen
for batches may be a little slower); a reduced-precision format is refused unless its best
kernel measures faster than the exact path's best float32 kernel over that same cost (on an AVX2
EPYC, bf16 beat `plain` but not oneDNN's packed float32, so it would have made T3 slower).

Weight formats (`precision`; every copy is private, the model's tensors are never touched):
- float32 (exact): `plain`; `gemv` (`W @ x^T`, decode sizes); `onednn` (weights prepacked into
  oneDNN's blocked layout, `torch.ops.mkldnn._linear_pointwise`, the op Inductor emits).
- bfloat16: `onednn-bf16` (packed bf16 weights; AMX / AVX512-BF16 run it natively), `bf16`
  (`F.linear` on a bf16 copy). Activations are cast to bf16 at the product, the result back.
- int8 (per-output-channel scales): `fbgemm-int8` (fbgemm's dynamic-quantized linear: fp32 in,
  activations quantized per call, VNNI where present), `int8pack` (`aten._weight_int8pack_mm`,
  weight-only, bf16 activations; vectorised only for bf16).
- int4 (groups of 64, asymmetric): `int4pack` (`aten._weight_int4pack_mm_for_cpu`, bf16
  activations). Weights whose shape the kernel cannot take (the 8194-row speech head) stay plain.

Each row count gets its kernel: decode-sized products (<= DECODE_ROWS rows) the candidate
fastest over one pass at the single request's rows plus one at BATCH_ROWS (the batch engine
decodes 8 requests as 16 rows: on an AVX-512 EPYC, `gemv` tied oneDNN at 2 rows and was 2.7x
slower at 16, so a 2-row measurement alone chose the kernel that made batches slow); one
request's own rows `plain` instead where plain measured faster there (float32 only: on an Intel
Xeon, oneDNN won at 16 rows and lost at 2); prefill-sized ones the faster of `plain` and the
decode kernel. So at most one private copy, whatever the row count.
Every prepared copy is checked once against `F.linear` of the weight it stands for; a copy whose
weight changed later (in place or a new Parameter) is rebuilt before use; a failure at run time
switches the table off (logged) and the step goes on with the plain kernels.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DECODE_ROWS = 16       # products with at most this many rows count as decode-sized
BATCH_ROWS = 16        # the batched decode measured too (8 requests of 2 CFG rows, generate_batch)
PREFILL_ROWS = 96      # the prefill size measured (an English prompt is ~34 + text + 2 rows)
SAMPLE_BYTES = 256e6   # fp32 bytes of the model's weights timed per candidate (whole layers)
INT4_GROUP = 64
COPY_MARGIN = 1.05     # float32: a kernel that keeps a private copy must be >5 % faster than plain
PRECISIONS = ("float32", "bfloat16", "int8", "int4")


def weight_of(module) -> torch.Tensor:
    """The (out, in) weight, as nn.Linear stores it; transformers' GPT-2 Conv1D (it has `nf`)
    stores (in, out)."""
    return module.weight.t() if hasattr(module, "nf") else module.weight


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _flat(fn):
    """Run a 2-D product on x of any rank."""
    def run(x, prepared):
        out = fn(x.reshape(-1, x.shape[-1]), prepared)
        return out.view(*x.shape[:-1], out.shape[-1])
    return run


# ---- the kernels --------------------------------------------------------------------------------
def _gemv(x, w):  # (M, K) -> (M, N): a GEMV over the weight's own row-major layout
    return torch.mm(w, x.t()).t().contiguous()


def _onednn_pack(w, rows):
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def _onednn(x, packed):
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, None, "none", [], "").float()


def _channel_scales(w):
    """Symmetric int8 scales, one per output channel (row): max |w| maps to 127."""
    return (w.abs().amax(1) / 127).clamp_min(1e-12)  # (N,)


def _int8_quantize(w):
    w = w.contiguous()
    scale = _channel_scales(w)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def _fbgemm_prepare(w, rows):
    w = w.float().contiguous()
    scale = _channel_scales(w).double()
    qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None), qw.dequantize()


def _fbgemm(x, packed):
    # reduce_range only where 16-bit saturation is possible (no VNNI): fbgemm's own advice.
    return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, not _has_vnni())


def _int8pack_prepare(w, rows):
    q, scale = _int8_quantize(w.float())
    return (q, scale.bfloat16()), q.float() * scale.bfloat16().float()[:, None]


def _int8pack(x, prepared):
    return torch.ops.aten._weight_int8pack_mm(x.bfloat16().contiguous(), *prepared).float()


def _int4pack_prepare(w, rows):
    n, k = w.shape
    groups = w.float().contiguous().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = ((groups - low) / scale).round().clamp(0, 15)  # 0..15; the kernel computes (q - 8) * s + z
    scale, zero = scale.bfloat16(), (low + 8 * scale).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1)
    scales_zeros = torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous()
    dequant = ((q - 8) * scale.float() + zero.float()).reshape(n, k)
    return (packed, scales_zeros), dequant


def _int4pack(x, prepared):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16().contiguous(), prepared[0], INT4_GROUP,
                                                      prepared[1]).float()


@dataclass(frozen=True)
class Kernel:
    """One way to compute `x @ W^T` for a weight W (out, in)."""

    name: str
    precision: str
    # (W, decode rows) -> (private copy, the fp32 weight the copy stands for)
    prepare: Callable | None
    run: Callable | None            # (x (M, K), copy) -> (M, N) float32
    max_rows: int | None = None     # above this, the plain kernel answers (gemv)
    supports: Callable = lambda w: True
    tolerance: float = 1e-4         # allowed |copy's product - F.linear(x, its weight)| / max


def _same(w, rows):
    return w, w


def _bf16_prepare(w, rows):
    b = w.detach().bfloat16().contiguous()
    return b, b.float()


def _bf16_pack(w, rows):
    b = w.detach().bfloat16()
    return _onednn_pack(b, rows), b.float()


KERNELS = {k.name: k for k in (
    Kernel("plain", "float32", None, None),
    Kernel("gemv", "float32", _same, _gemv, max_rows=DECODE_ROWS, supports=lambda w: w.is_contiguous()),
    Kernel("onednn", "float32", lambda w, rows: (_onednn_pack(w, rows), w), _onednn),
    Kernel("onednn-bf16", "bfloat16", _bf16_pack, _onednn, tolerance=2e-2),
    Kernel("bf16", "bfloat16", _bf16_prepare, lambda x, b: F.linear(x.bfloat16(), b).float(), tolerance=2e-2),
    Kernel("fbgemm-int8", "int8", _fbgemm_prepare, _fbgemm, tolerance=5e-2),
    Kernel("int8pack", "int8", _int8pack_prepare, _int8pack, tolerance=2e-2),
    Kernel("int4pack", "int4", _int4pack_prepare, _int4pack, tolerance=2e-2,
           supports=lambda w: w.shape[0] % 16 == 0 and w.shape[1] % INT4_GROUP == 0),
)}


def candidates(precision: str) -> list[str]:
    """The kernels that implement a weight format (float32 includes `plain`)."""
    return [name for name, k in KERNELS.items() if k.precision == precision]


# ---- the table a backbone multiplies through ----------------------------------------------------
class KernelTable:
    """Private prepared copies of T3's weights for one decode kernel, and which kernel answers
    decode-sized and prefill-sized products. `__call__` returns None where the plain kernel
    should answer (a weight the kernel cannot take, a plain phase, or the table switched off)."""

    def __init__(self, modules, decode: str, prefill: str, rows: int = 2, single: str | None = None):
        """decode: the kernel of products of rows+1..DECODE_ROWS rows (batched decoding); single:
        of products of at most `rows` rows (one request's decode; default: `decode`); prefill:
        of larger ones. At most one kernel among them keeps copies; the others are `plain`."""
        self.decode, self.prefill, self.rows = KERNELS[decode], KERNELS[prefill], rows
        self.single = KERNELS[single] if single else None  # None: `decode` answers those rows too
        self.disabled: str | None = None
        self.entries = {}
        kernels = [k for k in (self.single, self.decode, self.prefill) if k is not None]
        keeping = {k.name: k for k in kernels if k.prepare is not None}
        if len(keeping) > 1:
            raise ValueError(f"one kernel with copies per table, got {sorted(keeping)}")
        self.kernel = next(iter(keeping.values()), None)  # the one that keeps copies
        if self.kernel is not None:
            for module in modules:
                if self.kernel.supports(weight_of(module)):
                    self.entries[module] = self._entry(module, verify=not self.entries)

    def _entry(self, module, verify=False):
        param = module.weight
        copy, stands_for = self.kernel.prepare(weight_of(module).detach(), self.rows)
        if verify:
            check_product(self.kernel, copy, stands_for)
        return param, param._version, copy

    @property
    def nbytes(self) -> int:
        """About how many bytes the private copies take (0 when the kernel reads the model's own
        weights): weights times the format's bytes per weight (scales not counted)."""
        if self.kernel is None or self.kernel.prepare is _same:
            return 0
        per_weight = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5}[self.kernel.precision]
        return int(sum(p.numel() for p, _, _ in self.entries.values()) * per_weight)

    def __call__(self, module, x: torch.Tensor):
        rows = _rows(x)
        if self.single is not None and rows <= self.rows:  # one request's decode (T3: rows = its rows)
            kernel = self.single
        else:
            kernel = self.decode if rows <= DECODE_ROWS else self.prefill
        if self.disabled is not None or kernel.run is None or kernel is not self.kernel:
            return None
        if kernel.max_rows is not None and _rows(x) > kernel.max_rows:
            return None
        entry = self.entries.get(module)
        if entry is None:
            return None
        try:
            param, version, copy = entry
            if module.weight is not param or param._version != version:  # changed since prepared
                param, version, copy = self.entries[module] = self._entry(module)
            out = _flat(kernel.run)(x, copy)
            return out if module.bias is None else out + module.bias
        except Exception as exc:  # keep decoding on the plain kernels
            self.disabled = f"{type(exc).__name__}: {exc}"
            logger.warning("chatterbox_accel: %s kernel failed (%s); using the plain kernels",
                           kernel.name, self.disabled)
            return None


def project(table, module, x: torch.Tensor, plain):
    """`module`'s product with x: through `table` (a KernelTable, or None) where it answers, else
    `plain(module, x)`."""
    out = table(module, x) if table is not None else None
    return out if out is not None else plain(module, x)


def check_product(kernel: Kernel, copy, stands_for: torch.Tensor) -> None:
    """One product of a prepared copy against F.linear of the weight it stands for: a kernel that
    is broken or numerically off on this machine (a layout or scale convention) is refused here."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, stands_for.shape[1], generator=g)
    want = F.linear(x.double(), stands_for.double()).float()
    got = kernel.run(x, copy)
    scale = want.abs().max().clamp_min(1e-6)
    if got.shape != want.shape or not torch.isfinite(got).all() or (got - want).abs().max() > kernel.tolerance * scale:
        raise RuntimeError(f"the {kernel.name} kernel disagrees with F.linear on this machine")


# ---- choosing by measurement --------------------------------------------------------------------
@dataclass
class Selection:
    """What `select` measured and chose. `timings[kernel][phase]` in seconds per pass over the
    sample; `skipped[kernel]` says why a candidate was not timed."""

    precision: str
    decode: str
    prefill: str
    timings: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0
    pinned: bool = False
    single: str = ""  # the kernel of one request's decode rows ("" = decode's)

    def alternatives(self) -> list[str]:
        """The other timed kernels of this (reduced) precision that measured faster than the exact
        path's best float32 kernel (`decode_cost`), best first: what the output check falls back
        to, one at a time."""
        exact = exact_cost(self.timings)
        names = [n for n, t in self.timings.items() if n != self.decode and KERNELS[n].precision == self.precision
                 and decode_cost(n, t, self.precision) < exact]
        return sorted(names, key=lambda n: decode_cost(n, self.timings[n], self.precision))

    def with_decode(self, name: str) -> "Selection":
        """The same measurement with `name` as the decode kernel (prefill: the faster of plain
        and it, as `select` picks)."""
        from dataclasses import replace

        return replace(self, decode=name, single="", prefill=_faster_prefill(self.timings, name))

    def speedup(self, phase: str = "decode") -> float | None:
        """Measured plain time / chosen kernel time for a phase (None when not measured)."""
        plain = self.timings.get("plain", {}).get(phase)
        chosen = self.timings.get(getattr(self, phase), {}).get(phase)
        return plain / chosen if plain and chosen else None

    def describe(self) -> str:
        single = f", one request's decode {self.single}" if self.single and self.single != self.decode else ""
        if self.pinned:
            return f"{self.precision}: decode {self.decode}, prefill {self.prefill} (pinned, not measured)"
        parts = []
        for name, t in self.timings.items():
            batch = f"/{t['batch'] * 1e3:.1f}" if "batch" in t else ""
            parts.append(f"{name} {t['decode'] * 1e3:.1f}{batch}/{t['prefill'] * 1e3:.1f} ms")
        parts += [f"{name} skipped ({why})" for name, why in self.skipped.items()]
        return (f"{self.precision}: decode {self.decode}{single}, prefill {self.prefill}; measured decode/"
                f"{BATCH_ROWS}-row decode/prefill "
                f"per sample pass: " + ", ".join(parts) + f" (in {self.seconds:.2f} s)")


class KernelRefused(RuntimeError):
    """No kernel of the asked-for precision measured faster than the plain float32 kernel."""


def sample_modules(modules, budget: float = SAMPLE_BYTES) -> list:
    """The first modules (whole layers' worth, in order) whose fp32 weights reach `budget` bytes:
    enough to stream from memory rather than cache on most CPUs, little enough to time quickly."""
    out, total = [], 0
    for module in modules:
        out.append(module)
        total += module.weight.numel() * 4
        if total >= budget:
            break
    return out


def time_kernel(name: str, modules, plain: Callable, rows: int, reps: int = 3) -> dict:
    """{phase: best seconds per pass} of one kernel over `modules` at decode, batch and prefill rows,
    through a KernelTable of its own: the same preparation, check and dispatch as decoding uses."""
    kernel = KERNELS[name]
    table = KernelTable(modules, name, name, rows)
    g = torch.Generator().manual_seed(0)
    out = {}
    # The prefill is compute-bound: a quarter of the sample times it as well, 4x faster.
    for phase, n, part in (("decode", rows, modules), ("batch", BATCH_ROWS, modules),
                           ("prefill", PREFILL_ROWS, modules[: max(1, len(modules) // 4)])):
        if kernel.max_rows is not None and n > kernel.max_rows:
            out[phase] = float("inf")  # not used at this size
            continue
        xs = {k: torch.randn(n, k, generator=g) for k in {weight_of(m).shape[1] for m in part}}
        best = float("inf")
        with torch.inference_mode():
            for rep in range(reps + 1):  # the first pass warms up (oneDNN builds its primitives)
                start = time.perf_counter()
                for m in part:
                    project(table, m, xs[weight_of(m).shape[1]], plain)
                if rep:
                    best = min(best, time.perf_counter() - start)
        out[phase] = best
    if table.disabled is not None:  # it failed while timed: what was timed was the plain kernel
        raise RuntimeError(table.disabled)
    return out


def decode_cost(name: str, timing: dict, precision: str) -> float:
    """What `select` minimises for the decode kernel: one pass at the single request's rows plus
    one at BATCH_ROWS (a request alone, and a batch), and on the exact path a kernel that keeps a
    private copy (memory) pays COPY_MARGIN: it must buy a clear gain, not noise. So a single
    request may run a kernel a little slower at its own rows than `plain`, where that kernel
    is much faster for batches."""
    copies = KERNELS[name].prepare not in (None, _same)
    t = timing["decode"] + timing.get("batch", 0.0)
    return t * (COPY_MARGIN if precision == "float32" and copies else 1.0)


def exact_cost(timings: dict) -> float:
    """The least decode cost among the float32 kernels timed (what the exact path would run)."""
    return min(decode_cost(n, t, "float32") for n, t in timings.items() if KERNELS[n].precision == "float32")


def select(modules, plain: Callable, precision: str = "float32", *, rows: int = 2,
           allowed: tuple | None = None, pinned: str | None = None, timer: Callable | None = None,
           exact_allowed: tuple | None = None) -> Selection:
    """Time the candidates of `precision` (and `plain`) on a sample of `modules`; pick per phase.

    allowed: kernel names that may be chosen (None: all of that precision). pinned: use this
    kernel without measuring. timer(name) -> {"decode": s, "prefill": s} replaces the real timing
    (tests inject timings and failures through it). Raises KernelRefused when a reduced-precision
    format has no kernel that works here and measures faster than plain float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; allowed values: {list(PRECISIONS)}")
    if pinned is not None:
        if pinned not in KERNELS or KERNELS[pinned].precision != precision:
            raise ValueError(f"cpu_kernel={pinned!r} is not a {precision} kernel; choose one of "
                             f"{['auto'] + candidates(precision)}")
        prefill = pinned if KERNELS[pinned].max_rows is None else "plain"
        return Selection(precision, pinned, prefill, pinned=True)
    start = time.perf_counter()
    sample = sample_modules(modules)
    timer = timer or (lambda name: time_kernel(name, sample, plain, rows))
    names = ["plain"] + [n for n in candidates(precision) if n != "plain" and (allowed is None or n in allowed)]
    if precision != "float32":  # a reduced format must beat the exact path's own best kernel
        names += [n for n in candidates("float32") if n != "plain" and (exact_allowed is None or n in exact_allowed)]
    timings, skipped = {}, {}
    for name in names:
        try:
            timings[name] = timer(name)
        except Exception as exc:  # an op missing from this build, a kernel refused, ...
            if name == "plain":
                raise
            skipped[name] = f"{type(exc).__name__}: {exc}"
    fmt = [n for n in timings if KERNELS[n].precision == precision]
    decode = min(fmt, key=lambda name: decode_cost(name, timings[name], precision)) if fmt else None
    if precision != "float32" and (decode is None or not decode_cost(decode, timings[decode], precision)
                                   < exact_cost(timings)):
        detail = ", ".join(f"{n} {t['decode'] * 1e3:.1f}/{t.get('batch', 0) * 1e3:.1f} ms" for n, t in timings.items())
        detail += "".join(f", {n} failed ({why})" for n, why in skipped.items())
        raise KernelRefused(f"no {precision} kernel measured faster than the exact path's best float32 kernel "
                            f"here (decode/{BATCH_ROWS}-row decode per sample pass: {detail})")
    # One request's decode rows: plain where it measured faster there than the chosen kernel
    # (float32: plain keeps no copy, so the copy serves batches and the prefill only). A reduced
    # precision keeps its kernel: a request asked for that format.
    single = ""
    if precision == "float32" and decode != "plain" and timings["plain"]["decode"] < timings[decode]["decode"]:
        single = "plain"
    return Selection(precision, decode, _faster_prefill(timings, decode), timings, skipped,
                     time.perf_counter() - start, single=single)


def _faster_prefill(timings: dict, decode: str) -> str:
    """The prefill's kernel: the faster of plain and the decode kernel (at most one copy)."""
    return min({"plain", decode}, key=lambda n: (timings[n]["prefill"], n != "plain"))


_VNNI = None


def _has_vnni() -> bool:
    global _VNNI
    if _VNNI is None:
        _VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features())
    return _VNNI


def cpu_features() -> set:
    """The CPU's matrix-relevant feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    wanted = {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
              "amx_tile", "avx512_fp16"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return wanted & set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()

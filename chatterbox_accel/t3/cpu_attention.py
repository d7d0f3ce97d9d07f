"""T3's decode-step attention on a CPU: a small C kernel, built on this machine, checked against
SDPA, and used only where it measures faster.

A decode step's attention is one query per row and head against that row's cached keys and
values: a pass over the KV cache, bound by memory. PyTorch's CPU SDPA serves it with its flash
kernel, which for a single query per head costs about twice the cache read, and with a
positional mask it reads every row up to the longest row. Measured at 16 rows (the batch
engine's 8 requests), 16 heads of 64, 128 positions, 30 layers, 2-core AMD EPYC (Zen 5):
SDPA 28-29 ms per step, this kernel 16-17 ms, a plain read of the same bytes 14 ms. At 2 rows
(one request) 3.6-3.7 ms against 2.1 ms.

`decode_attention.c` is compiled once per machine with the system C compiler (`$CC`, else
`cc`/`gcc`), `-O3 -march=native`, OpenMP when torch runs on it (the kernel then shares torch's
libgomp and thread count), into a cache directory keyed by the source, flags, compiler and CPU
(`$CHATTERBOX_ACCEL_CACHE`, else `~/.cache/chatterbox_accel`). `-march=native` code is never
loaded on another CPU model: the key holds the CPU's model and flags. Reassociation is allowed
(vectorised dot products and sums), `-ffast-math` is not (it can set flush-to-zero for the
whole process when the library loads).

`select()` builds it, checks it on a random cache with garbage past every row's position, and
times it against SDPA at 2 and 16 rows over the model's own head sizes. Anything the kernel does
not take (more than one query position, non-float32, autograd, a head dimension that is not
contiguous) goes to `sdpa_attention` unchanged, so prefill is SDPA's as before.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .model import sdpa_attention

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fPIC", "-shared")
PROBE_ROWS = (2, 16)  # one request's CFG pair, and the batch engine's 8 requests
PROBE_LEN = 256       # cache positions read per row in the timing
PROBE_LAYERS = 4      # distinct buffers cycled through, so the timing reads memory, not cache


class Unavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("CHATTERBOX_ACCEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chatterbox_accel")
    return Path(root) / "native"


def _machine() -> str:
    """What -march=native compiles for: the CPU's model name and feature flags."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "cpu family", "model\t")):
                    text += line
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        pass
    return platform.machine() + "\n" + text


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise Unavailable("no C compiler found (cc, gcc): install one or set CC to build the CPU "
                          "decode-attention kernel; SDPA is used meanwhile")
    return cc


def build(cc: str | None = None) -> Path:
    """The compiled kernel's path, building it into the cache directory if it is not there."""
    if sys.platform != "linux":
        raise Unavailable(f"the CPU decode-attention kernel is built on Linux only (this is {sys.platform})")
    cc = cc or compiler()
    flags = list(FLAGS)
    if "OpenMP" in torch.__config__.parallel_info():
        flags.append("-fopenmp")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise Unavailable(f"C compiler {cc!r} does not run ({e}); set CC to a working one") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     _machine().encode()])).hexdigest()[:16]
    target = cache_dir() / f"decode_attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise Unavailable(f"{cc} could not build {SOURCE.name}: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)  # atomic: a concurrent process loads a whole file or builds its own
    except subprocess.SubprocessError as e:
        raise Unavailable(f"{cc} did not finish building {SOURCE.name}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path):
    lib = ctypes.CDLL(str(path))
    fn = lib.decode_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr] * 5 + [i64] * 14 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class CpuDecodeAttention:
    """`attention(q, k_buf, v_buf, input_pos, kv_len)` with `sdpa_attention`'s signature and
    meaning: the C kernel for one-position float32 queries on a CPU, SDPA for anything else."""

    name = "native"

    def __init__(self, fn):
        self.fn = fn

    @staticmethod
    def takes(q, k_buf, v_buf) -> bool:
        tensors = (q, k_buf, v_buf)
        return (q.dim() == 4 and q.shape[2] == 1 and k_buf.shape == v_buf.shape
                and k_buf.shape[:2] == q.shape[:2] and k_buf.shape[3] == q.shape[3]
                and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))

    def __call__(self, q, k_buf, v_buf, input_pos, kv_len: int):
        if not self.takes(q, k_buf, v_buf) or not 0 < kv_len <= k_buf.shape[2]:
            return sdpa_attention(q, k_buf, v_buf, input_pos, kv_len)
        B, H, _, D = q.shape
        pos = input_pos.reshape(-1)
        if pos.numel() != B:
            if pos.numel() != 1:
                return sdpa_attention(q, k_buf, v_buf, input_pos, kv_len)
            pos = pos.expand(B)
        pos = pos.to(torch.int64).contiguous()
        out = torch.empty(B, H, 1, D, dtype=q.dtype)
        failed = self.fn(q.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(), out.data_ptr(), pos.data_ptr(),
                         B, H, D, kv_len, q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1),
                         k_buf.stride(2), v_buf.stride(0), v_buf.stride(1), v_buf.stride(2),
                         out.stride(0), out.stride(1), D ** -0.5, torch.get_num_threads())
        if failed:  # a scratch allocation failed: this call takes SDPA
            logger.warning("CPU decode attention could not allocate its scratch; SDPA for this call")
            return sdpa_attention(q, k_buf, v_buf, input_pos, kv_len)
        return out


def make() -> CpuDecodeAttention:
    """Build (or find) and load the kernel, and check it on a small random case; raises
    Unavailable saying why not."""
    path = build()
    try:
        attention = CpuDecodeAttention(load(path))
    except (OSError, AttributeError) as e:  # not loadable, or no such symbol in it
        raise Unavailable(f"the built kernel {path} does not load: {e}") from e
    error = probe_error(attention)
    if not error <= 1e-5:
        raise Unavailable(f"the built kernel disagrees with SDPA by {error:.2e} on a random probe")
    return attention


def probe_error(attention, heads: int = 4, head_dim: int = 64) -> float:
    """Largest difference from SDPA on a strided cache view, per-row and shared positions,
    with NaN past every row's position (the lazy cache's unwritten slots)."""
    gen = torch.Generator().manual_seed(0)
    B, T, kv_len = 3, 40, 33
    k = torch.randn(2, B, heads, T, head_dim, generator=gen)[1]  # a layer of a larger buffer
    v = torch.randn(2, B, heads, T, head_dim, generator=gen)[1]
    q = torch.randn(B, heads, 1, head_dim, generator=gen)
    worst = 0.0
    with torch.inference_mode():
        for pos in (torch.tensor([[0], [17], [32]]), torch.tensor([20])):
            per_row = pos.reshape(-1).expand(B)
            garbage_k, garbage_v = k.clone(), v.clone()
            for b in range(B):
                garbage_k[b, :, int(per_row[b]) + 1 :] = float("nan")
                garbage_v[b, :, int(per_row[b]) + 1 :] = float("nan")
            got = attention(q, garbage_k, garbage_v, pos, kv_len)
            want = sdpa_attention(q, k, v, pos, kv_len)
            error = float((got - want).abs().max())
            worst = max(worst, error) if error == error else float("inf")  # NaN: as wrong as can be
            if worst == float("inf"):
                break
    return worst


def measure(attention, heads: int, head_dim: int, rows=PROBE_ROWS) -> dict:
    """ms per layer of one decode step, {rows: (kernel, sdpa)}, over PROBE_LAYERS buffers of
    PROBE_LEN positions (the best of three passes)."""
    times = {}
    with torch.inference_mode():
        for B in rows:
            k = torch.zeros(PROBE_LAYERS, B, heads, PROBE_LEN, head_dim)
            v = torch.zeros_like(k)
            q = torch.randn(B, heads, 1, head_dim)
            pos = torch.full((B, 1), PROBE_LEN - 1)
            pair = []
            for fn in (attention, sdpa_attention):
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    for layer in range(PROBE_LAYERS):
                        fn(q, k[layer], v[layer], pos, PROBE_LEN)
                    best = min(best, (time.perf_counter() - start) / PROBE_LAYERS * 1e3)
                pair.append(best)
            times[B] = tuple(pair)
    return times


def describe(times: dict) -> str:
    return ", ".join(f"{b} rows {k:.2f} vs {s:.2f} ms" for b, (k, s) in times.items())


def select(heads: int, head_dim: int, measure_first: bool = True):
    """(attention, note): the kernel, or None where (with `measure_first`) it measured no faster
    than SDPA summed over PROBE_ROWS. Raises Unavailable when it cannot be built, loaded or
    trusted here."""
    attention = make()
    if not measure_first:
        return attention, "native kernel (not measured: attention='native')"
    times = measure(attention, heads, head_dim)
    kernel, sdpa = (sum(t[i] for t in times.values()) for i in (0, 1))
    note = f"per layer: native vs SDPA {describe(times)}"
    if kernel >= sdpa:
        return None, f"the native kernel measured slower than SDPA here ({note})"
    return attention, note

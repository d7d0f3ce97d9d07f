"""The CPU decode-attention kernel (t3/cpu_attention.py): parity with SDPA and with the original
T3 (its tokens: test_t3_parity's low-temperature test, parametrized), what it hands to SDPA,
and its fallbacks when it cannot be built, is wrong or is slower."""
import ctypes
import stat
import sys

import pytest
import torch

from chatterbox_accel import accelerate, restore
from chatterbox_accel.api import runner_of
from chatterbox_accel.checkpoints import full_t3
from chatterbox_accel.t3 import cpu_attention
from chatterbox_accel.t3.cache import StaticKVCache
from chatterbox_accel.t3.model import sdpa_attention
from conftest import original_forced_logits, probe
from test_t3_parity import assert_close, fast_forced_logits

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built on Linux")


@pytest.fixture(scope="module")
def native():
    try:
        return cpu_attention.make()
    except cpu_attention.Unavailable as e:  # CI machines have gcc; say so loudly if one does not
        pytest.fail(f"the kernel did not build here: {e}")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTERBOX_ACCEL_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("heads,head_dim", [(16, 64), (3, 24), (2, 1)])
def test_kernel_matches_sdpa_on_a_decode_cache(native, heads, head_dim):
    """Per-row positions in a lazy cache's layer view, unwritten (NaN) slots past each row's
    position (which SDPA's mask multiplies by zero, so SDPA gets them zeroed)."""
    torch.manual_seed(heads)
    cache = StaticKVCache(3, 5, heads, 96, head_dim, torch.float32, "cpu", lazy=True)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    pos = torch.tensor([[0], [9], [40], [63], [31]])
    for b, p in enumerate(pos[:, 0].tolist()):
        cache.k[:, b, :, : p + 1] = torch.randn(3, heads, p + 1, head_dim)
        cache.v[:, b, :, : p + 1] = torch.randn(3, heads, p + 1, head_dim)
    q = torch.randn(5, heads, 1, head_dim)
    got = native(q, cache.k[1], cache.v[1], pos, 64)
    clean_k, clean_v = torch.nan_to_num(cache.k[1], nan=0.0), torch.nan_to_num(cache.v[1], nan=0.0)
    want = sdpa_attention(q, clean_k, clean_v, pos, 64)
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5
    shared = torch.tensor([50])  # one position for every row (the eager teacher-forced loop)
    k, v = torch.randn(5, heads, 64, head_dim), torch.randn(5, heads, 64, head_dim)
    assert (native(q, k, v, shared, 64) - sdpa_attention(q, k, v, shared, 64)).abs().max() <= 1e-5


def test_what_the_kernel_does_not_take_goes_to_sdpa_unchanged(native):
    torch.manual_seed(0)
    k, v = torch.randn(2, 4, 32, 16), torch.randn(2, 4, 32, 16)
    prefill_q, pos = torch.randn(2, 4, 7, 16), torch.arange(3, 10)
    assert torch.equal(native(prefill_q, k, v, pos, 16), sdpa_attention(prefill_q, k, v, pos, 16))
    q = torch.randn(2, 4, 1, 16)
    half = (q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.equal(native(*half, torch.tensor([9]), 16), sdpa_attention(*half, torch.tensor([9]), 16))
    grad_q = q.clone().requires_grad_()
    out = native(grad_q, k, v, torch.tensor([9]), 16)
    out.sum().backward()  # SDPA's, so it has a gradient
    assert grad_q.grad is not None


def test_the_kernel_is_built_once_per_machine(private_cache, monkeypatch):
    path = cpu_attention.build()
    assert path.parent == private_cache / "native"
    built = path.stat().st_mtime_ns
    assert cpu_attention.build() == path and path.stat().st_mtime_ns == built  # found, not rebuilt
    monkeypatch.setattr(cpu_attention, "_machine", lambda: "another CPU model with other flags")
    other = cpu_attention.build()
    assert other != path, "-march=native code must not be loaded on another CPU"
    assert sorted(p.name for p in private_cache.joinpath("native").iterdir()) == sorted([path.name, other.name])


def write_compiler(tmp_path, body):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n" + body)
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    return str(cc)


def test_no_compiler_or_a_failing_one_says_why(private_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(cpu_attention.Unavailable, match="no C compiler"):
        cpu_attention.build()
    failing = write_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0;; *) echo "fatal: no space" >&2; '
                                       'exit 1;; esac\n')
    with pytest.raises(cpu_attention.Unavailable, match="fatal: no space"):
        cpu_attention.build(failing)
    assert not any(private_cache.joinpath("native").iterdir()), "a failed build leaves no file behind"


def test_accelerate_falls_back_to_sdpa_when_the_kernel_cannot_be_built(tiny_model, private_cache, monkeypatch,
                                                                       tmp_path):
    monkeypatch.setenv("CC", write_compiler(tmp_path, "exit 1\n"))
    report = accelerate(tiny_model, attention="native")
    try:
        assert report.ok and "t3.attention.sdpa" in report.applied
        assert "t3.attention.native" not in report.applied
        assert "does not run" in report.fallbacks["t3.attention.native"] or \
            "could not build" in report.fallbacks["t3.attention.native"]
        assert runner_of(tiny_model).llama.attention is sdpa_attention
    finally:
        restore(tiny_model)


def test_a_kernel_that_disagrees_with_sdpa_is_refused(tiny_model, monkeypatch):
    """Inject a wrong kernel (it writes zeros): the probe refuses it and SDPA is used."""
    def wrong(q, k, v, out, pos, B, H, D, *rest):
        ctypes.memset(out, 0, B * H * D * 4)
        return 0

    monkeypatch.setattr(cpu_attention, "load", lambda path: wrong)
    report = accelerate(tiny_model, attention="auto")
    try:
        assert "disagrees with SDPA" in report.fallbacks["t3.attention.native"]
        assert "t3.attention.sdpa" in report.applied and report.ok
    finally:
        restore(tiny_model)


def test_auto_keeps_sdpa_where_the_kernel_measures_slower(tiny_model, monkeypatch):
    monkeypatch.setattr(cpu_attention, "measure", lambda *a, **k: {2: (0.5, 0.2), 16: (3.0, 2.0)})
    report = accelerate(tiny_model)
    try:
        assert "t3.attention.sdpa" in report.applied
        assert "t3.attention.native" not in report.fallbacks  # not a failure: the measured choice
        assert "slower than SDPA" in report.attention and "16 rows 3.00 vs 2.00 ms" in report.attention
    finally:
        restore(tiny_model)
    monkeypatch.setattr(cpu_attention, "measure", lambda *a, **k: {2: (0.1, 0.2), 16: (1.0, 2.0)})
    report = accelerate(tiny_model)
    try:
        assert "t3.attention.native" in report.applied and "attention per layer" in str(report)
        assert isinstance(runner_of(tiny_model).llama.attention, cpu_attention.CpuDecodeAttention)
    finally:
        restore(tiny_model)


def test_native_decode_matches_the_original_loop(tiny_t3, native, monkeypatch):
    t3_cond, text, forced = probe(tiny_t3, steps=12)
    ref = original_forced_logits(tiny_t3, t3_cond, text, forced, 0.5, monkeypatch)
    for installed in (False, True):  # eager (shared positions), the decoder (per-row positions)
        assert_close(fast_forced_logits(tiny_t3, t3_cond, text, forced, 0.5, attention=native, installed=installed),
                     ref)


def test_full_size_native_decode_matches_the_original_loop(native, monkeypatch):
    t3 = full_t3(seed=3)
    t3_cond, text, forced = probe(t3, steps=6)
    ref = original_forced_logits(t3, t3_cond, text, forced, 0.5, monkeypatch)
    assert_close(fast_forced_logits(t3, t3_cond, text, forced, 0.5, attention=native, installed=True), ref)


def test_attention_option_is_validated():
    from chatterbox_accel.config import AccelConfig

    assert AccelConfig(attention="native").attention == "native"
    with pytest.raises(ValueError, match="attention='fast'.*native"):
        AccelConfig(attention="fast")

"""Fast T3 decode vs the original chatterbox T3.inference, same weights."""
import sys

import pytest
import torch

from chatterbox_accel import accelerate, restore
from chatterbox_accel.check import reference_logits
from chatterbox_accel.checkpoints import full_t3
from chatterbox_accel.t3.decode import T3Runner
from chatterbox_accel.t3.model import sdpa_attention
from conftest import fresh, holder, original_forced_logits, probe

REL_TOL = 1e-5  # fp32: SDPA over a static cache vs HF's forward differ only by rounding


def assert_close(fast, ref, rel=REL_TOL):
    diff = (fast - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= rel * scale, f"max |dlogit| {diff:.3g} > {rel:g} x max|logit| {scale:.3g}"


def fast_forced_logits(t3, t3_cond, text, forced, cfg_weight, kernel="onednn", attention=sdpa_attention,
                       installed=False):
    """kernel: the float32 kernel every product runs on (t3/kernels.py; gemv at decode sizes only).
    installed: through the one-slot decoder and the installed step (per-row positions), else the
    eager loop (positions shared by the CFG pair)."""
    runner = T3Runner(t3, attention=attention)
    runner.use_kernels(kernel, "plain" if kernel == "gemv" else kernel)
    embeds = runner.build_prompt(fresh(t3_cond), text, cfg_weight)
    if installed:
        return runner.step_forced_logits(embeds, forced[:-1], cfg_weight)
    return runner.teacher_forced_logits(embeds, forced[:-1], cfg_weight)


@pytest.mark.parametrize("cfg_weight,kernel", [(0.5, "onednn"), (0.5, "plain"), (0.5, "gemv"), (0.3, "onednn"),
                                               (1.0, "plain")])
def test_teacher_forced_logits_match_original_loop(tiny_t3, cfg_weight, kernel, monkeypatch):
    t3_cond, text, forced = probe(tiny_t3, steps=12)
    ref = original_forced_logits(tiny_t3, t3_cond, text, forced, cfg_weight, monkeypatch)
    fast = fast_forced_logits(tiny_t3, t3_cond, text, forced, cfg_weight, kernel)
    assert fast.shape == ref.shape == (12, 8194)
    assert_close(fast, ref)


def test_full_size_teacher_forced_logits_match_original_loop(monkeypatch):
    t3 = full_t3(seed=3)
    t3_cond, text, forced = probe(t3, steps=6)
    ref = original_forced_logits(t3, t3_cond, text, forced, 0.5, monkeypatch)
    fast = fast_forced_logits(t3, t3_cond, text, forced, 0.5)
    assert_close(fast, ref)


def test_without_cfg_matches_the_conditional_row(tiny_t3):
    """cfg_weight=0 runs batch 1 (the original cannot run it at all: it always stacks 2 BOS rows)."""
    t3_cond, text, forced = probe(tiny_t3, steps=8, cfg_weight=0.0)
    runner = T3Runner(tiny_t3, attention=sdpa_attention)
    embeds = runner.build_prompt(fresh(t3_cond), text, 0.0)
    assert embeds.shape[0] == 1
    fast = runner.teacher_forced_logits(embeds, forced, 0.0)
    ref = reference_logits(tiny_t3, embeds, forced, 0.0)
    assert_close(fast, ref)


@pytest.mark.parametrize("attention", ["auto", pytest.param("native", marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the C decode attention is built on Linux"))])
def test_low_temperature_gives_the_same_tokens(tiny_t3, attention):
    # 1e-6: any top-2 logit gap above ~1e-4 decides the token regardless of the RNG (at 1e-3,
    # random weights hit gaps small enough for the draw to matter a few % of steps).
    torch.manual_seed(0)
    t3_cond, text, _ = probe(tiny_t3)
    kwargs = dict(text_tokens=text, max_new_tokens=40, temperature=1e-6, cfg_weight=0.5, top_p=1.0)
    original = type(tiny_t3).inference(tiny_t3, t3_cond=fresh(t3_cond), **kwargs)
    model = holder(tiny_t3)
    report = accelerate(model, check=False, attention=attention)
    try:
        assert attention == "auto" or f"t3.attention.{attention}" in report.applied
        fast = tiny_t3.inference(t3_cond=fresh(t3_cond), **kwargs)
    finally:
        restore(model)
    assert fast.shape[-1] > 10
    assert fast.tolist() == original.tolist()


def test_stops_at_eos_like_the_original():
    from chatterbox_accel.checkpoints import tiny_t3

    t3 = tiny_t3(stop_after=9)
    t3_cond, text, _ = probe(t3)
    kwargs = dict(text_tokens=text, max_new_tokens=100, temperature=0.8, cfg_weight=0.5)
    torch.manual_seed(0)
    original = type(t3).inference(t3, t3_cond=fresh(t3_cond), **kwargs)
    model = holder(t3)
    accelerate(model, check=False, eos_check_every=4)  # decodes past EOS, must trim
    fast = t3.inference(t3_cond=fresh(t3_cond), **kwargs)
    assert original.shape == fast.shape == (1, 10)
    stop = t3.hp.stop_speech_token
    assert fast[0, -1].item() == stop and (fast[0, :-1] != stop).all()  # trimmed right after the first EOS


def test_static_cache_is_reused_and_results_are_reproducible(tiny_t3):
    t3_cond, text, _ = probe(tiny_t3)
    model = holder(tiny_t3)
    report = accelerate(model, check=False)
    assert "t3.static_kv_cache" in report.applied
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=20))
    from chatterbox_accel.api import runner_of

    cache = runner_of(model).cache
    torch.manual_seed(7)
    runs.append(tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=20))
    assert runner_of(model).cache is cache, "a warm call of the same size must not reallocate the cache"
    assert runs[0].tolist() == runs[1].tolist() == runs[2].tolist()

"""CPU decode on oneDNN-packed weights (t3/prepack.py): parity, repacking, fallbacks."""
import pytest
import torch

import chatterbox_accel.t3.model as fast_model
import chatterbox_accel.t3.prepack as prepack
from chatterbox_accel import accelerate
from chatterbox_accel.api import fast_inference_of, runner_of
from conftest import fresh, holder, probe


def original_tokens(t3, seed=0, **kwargs):
    torch.manual_seed(seed)
    t3_cond, text, _ = probe(t3)
    return type(t3).inference(t3, t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=20, **kwargs)


def fast_tokens(t3, seed=0, **kwargs):
    torch.manual_seed(seed)
    t3_cond, text, _ = probe(t3)
    return t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=20, **kwargs)


def forced_logits(model):
    """The fast runner's teacher-forced CFG logits on the standard probe."""
    runner = runner_of(model)
    t3_cond, text, forced = probe(model.t3, steps=8)
    embeds = runner.build_prompt(fresh(t3_cond), text, 0.5)
    return runner.teacher_forced_logits(embeds, forced, 0.5)


def test_every_product_runs_packed_and_gives_the_original_tokens(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    report = accelerate(model)
    assert "t3.cpu_prepack" in report.applied and report.check.passed, str(report)
    packed = runner_of(model).backbone.packed
    assert len(packed.entries) == 7 * len(tiny_t3.tfmr.layers) + 1  # 7 projections per layer + speech head

    def plain(*args):
        raise AssertionError("a T3 product ran on the plain kernel")

    monkeypatch.setattr(fast_model, "linear", plain)
    assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()


def test_a_weight_changed_after_packing_is_repacked(tiny_t3):
    model = holder(tiny_t3)
    accelerate(model)
    before = forced_logits(model)
    weight = tiny_t3.tfmr.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(3.0)  # in place: the packed copy is now stale
    try:
        after = forced_logits(model)
        runner_of(model).backbone.packed = None  # the plain kernels on the changed weights
        plain = forced_logits(model)
    finally:
        with torch.no_grad():
            weight.div_(3.0)
    assert (after - before).abs().max() > 1e-2  # the change reached the packed path ...
    assert torch.allclose(after, plain, rtol=0, atol=1e-4 * plain.abs().max())  # ... exactly as plain


def test_packing_failure_falls_back_to_the_plain_kernels(tiny_t3, monkeypatch):
    def broken(weight, rows):
        raise RuntimeError("injected: no oneDNN kernel")

    monkeypatch.setattr(prepack, "_pack", broken)
    model = holder(tiny_t3)
    report = accelerate(model)
    assert "t3.cpu_prepack" not in report.applied and report.check.passed
    assert "injected: no oneDNN kernel" in report.fallbacks["t3.cpu_prepack"]
    assert runner_of(model).backbone.packed is None
    assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()


def test_run_time_failure_switches_packing_off_and_decoding_goes_on(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    accelerate(model)
    calls = []

    def broken(x, packed, bias):
        calls.append(1)
        raise RuntimeError("injected: oneDNN failed")

    monkeypatch.setattr(prepack, "_packed_linear", broken)
    assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()
    assert "injected: oneDNN failed" in runner_of(model).backbone.packed.disabled
    assert len(calls) == 1  # switched off at the first failure, not retried per product
    assert fast_inference_of(model).calls == {"fast": 1, "original": 0}  # the fast loop carried on


def test_a_kernel_that_disagrees_is_refused_at_packing(tiny_t3, monkeypatch):
    right = prepack._packed_linear
    monkeypatch.setattr(prepack, "_packed_linear", lambda x, packed, bias: right(x, packed, bias) * 1.001)
    report = accelerate(holder(tiny_t3))
    assert "disagrees with F.linear" in report.fallbacks["t3.cpu_prepack"]


@pytest.mark.parametrize("options,why", [({"cpu_prepack": False}, None),
                                         ({"compile": True, "check": False}, "compiled")])
def test_off_when_asked_or_when_the_step_is_compiled(tiny_t3, monkeypatch, options, why):
    import chatterbox_accel.api as api

    def compiled(runner, **kwargs):  # stands in for torch.compile (slow to run here): a new step
        runner.step = lambda *a, **kw: runner.decode_one_token(*a, **kw)
        return {"applied": ["t3.compile"], "fallbacks": {}}

    monkeypatch.setattr(api, "install_step", compiled)
    model = holder(tiny_t3)
    report = accelerate(model, **options)
    assert "t3.cpu_prepack" not in report.applied and runner_of(model).backbone.packed is None
    assert (why is None) == ("t3.cpu_prepack" not in report.fallbacks)
    if why:
        assert why in report.fallbacks["t3.cpu_prepack"]


def test_not_packed_on_a_cpu_where_it_was_not_measured(tiny_t3, monkeypatch):
    monkeypatch.setattr(prepack.platform, "machine", lambda: "arm64")
    model = holder(tiny_t3)
    report = accelerate(model)
    assert "not on arm64" in report.fallbacks["t3.cpu_prepack"] and runner_of(model).backbone.packed is None

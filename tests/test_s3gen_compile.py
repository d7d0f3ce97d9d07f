"""Opt-in torch.compile of S3Gen's CFM estimator: parity with the eager estimator, and every
way it can fail (compile error, wrong output, failure at run time) leaves the eager one."""
import types

import pytest
import torch
from chatterbox.models.s3gen.decoder import ConditionalDecoder

import chatterbox_accel.s3gen as s3gen_compile
from chatterbox_accel import accelerate, restore
from chatterbox_accel.patching import PatchRegistry
from chatterbox_accel.s3gen import CompiledEstimator, compile_estimator, estimator_of, probe_args

OPTIONS = dict(compile_targets=("t3", "s3gen"), check=False)


def holder_with(estimator):
    flow = types.SimpleNamespace(decoder=types.SimpleNamespace(estimator=estimator))
    return types.SimpleNamespace(s3gen=types.SimpleNamespace(flow=flow))


def test_real_dynamo_capture_matches_the_eager_estimator_at_other_lengths():
    """A real torch.compile (dynamo graph capture with dynamic shapes, AOTAutograd) of a
    1-down/1-mid-block estimator: installed after its warm-up, equal to eager at lengths it
    never saw, with no recompile. The backend is `aot_eager`: Inductor's code generation takes
    ~100 s here even for this small estimator (and ~90 s for the full one); its numerics are
    what compile_estimator's warm-up comparison checks on every install."""
    torch.manual_seed(0)
    estimator = ConditionalDecoder(n_blocks=1, num_mid_blocks=1).eval()
    registry = PatchRegistry()
    assert compile_estimator(holder_with(estimator), registry, backend="aot_eager") is None
    wrapper = estimator.forward._self_wrapper
    for frames in (57, 230):
        args = probe_args(estimator, frames)
        with torch.inference_mode():
            got = estimator(**args)  # through the patched forward: compiled
            want = type(estimator).forward(estimator, **args)  # the class's eager forward
        assert got.shape == want.shape == (2, 80, frames)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert wrapper.calls == {"compiled": 2, "eager": 0} and wrapper.disabled is None
    registry.revert()
    assert "forward" not in estimator.__dict__


def _eager_output(model):
    torch.manual_seed(11)
    return model.generate("Hi.")


def test_failing_compile_falls_back_and_says_why(tiny_model, monkeypatch):
    def broken(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("injected: inductor exploded")
        return compiled

    monkeypatch.setattr(s3gen_compile.torch, "compile", broken)
    report = accelerate(tiny_model, **OPTIONS)
    assert "s3gen.compile" not in report.applied
    assert "injected: inductor exploded" in report.fallbacks["s3gen.compile"]
    assert "forward" not in estimator_of(tiny_model).__dict__  # the eager estimator, unpatched
    restore(tiny_model)


def test_a_compiled_estimator_that_disagrees_is_not_installed(tiny_model, monkeypatch):
    monkeypatch.setattr(s3gen_compile.torch, "compile", lambda fn, **kw: (lambda *a, **k: fn(*a, **k) * 1.01))
    report = accelerate(tiny_model, **OPTIONS)
    assert "disagrees with the eager one" in report.fallbacks["s3gen.compile"]
    assert "forward" not in estimator_of(tiny_model).__dict__
    restore(tiny_model)


def test_run_time_failure_switches_to_eager_with_the_same_audio(tiny_model, monkeypatch):
    expected = _eager_output(tiny_model)
    calls = []

    def flaky(fn, **kwargs):  # passes the warm-up, then fails on the first real call
        def compiled(*args, **kw):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("injected: recompile limit")
            return fn(*args, **kw)
        return compiled

    monkeypatch.setattr(s3gen_compile.torch, "compile", flaky)
    report = accelerate(tiny_model, **OPTIONS)
    assert "s3gen.compile" in report.applied
    wrapper = estimator_of(tiny_model).forward._self_wrapper
    assert isinstance(wrapper, CompiledEstimator)
    out = _eager_output(tiny_model)
    assert "injected: recompile limit" in wrapper.disabled and wrapper.calls["eager"] > 0
    restore(tiny_model)
    assert torch.equal(out, expected)
    assert "forward" not in estimator_of(tiny_model).__dict__


def test_s3gen_target_is_opt_in():
    from chatterbox_accel.config import AccelConfig

    assert not AccelConfig().compiles_s3gen("cuda")
    assert AccelConfig(compile_targets=("s3gen",)).compiles_s3gen("cpu")
    assert not AccelConfig(compile_targets=("s3gen",), compile=False).compiles_s3gen("cuda")
    with pytest.raises(ValueError, match="compile_targets"):
        AccelConfig(compile_targets=("hift",))

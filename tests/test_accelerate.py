"""accelerate()/restore(): patching, exact reversal, the output check, and bad input."""
import warnings

import pytest
import torch
import wrapt

import chatterbox_accel
from chatterbox_accel import OutputCheckError, accelerate, is_accelerated, restore
from chatterbox_accel.checkpoints import tiny_t3 as make_tiny_t3
from chatterbox_accel.t3.model import FastLlama
from conftest import fresh, holder, probe, s3gen_tokens


def original_tokens(t3, seed=3):
    t3_cond, text, _ = probe(t3)
    torch.manual_seed(seed)
    return t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=15)


def test_patches_only_this_instance(tiny_t3):
    other = make_tiny_t3(seed=1)
    report = accelerate(holder(tiny_t3))
    assert report.ok and report.check.passed, str(report)
    assert isinstance(tiny_t3.__dict__["inference"], wrapt.FunctionWrapper)
    assert "inference" not in other.__dict__
    assert not isinstance(type(tiny_t3).__dict__["inference"], wrapt.FunctionWrapper)


def test_restore_leaves_the_model_exactly_as_it_was(tiny_t3):
    original_tokens(tiny_t3)  # the original's first call itself registers t3.patched_model
    before_state = {k: v.clone() for k, v in tiny_t3.state_dict().items()}
    before_dict = set(tiny_t3.__dict__)
    before_tokens = original_tokens(tiny_t3)
    model = holder(tiny_t3)
    accelerate(model)
    original_tokens(tiny_t3)  # exercise the fast path
    restore(model)
    assert set(tiny_t3.__dict__) == before_dict
    assert "inference" not in tiny_t3.__dict__
    assert not is_accelerated(model)
    for k, v in tiny_t3.state_dict().items():
        assert torch.equal(v, before_state[k]), f"parameter {k} changed"
    assert torch.equal(original_tokens(tiny_t3), before_tokens), "restored outputs are not bit-identical"


def test_accelerate_twice_then_restore_once(tiny_t3):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    first = tiny_t3.__dict__["inference"]
    accelerate(model, check=False, eos_check_every=2)
    assert tiny_t3.__dict__["inference"] is not first
    assert not isinstance(tiny_t3.__dict__["inference"].__wrapped__, wrapt.FunctionWrapper), "wrapped twice"
    restore(model)
    assert "inference" not in tiny_t3.__dict__


def test_restore_on_a_model_never_accelerated_is_a_no_op(tiny_t3):
    model = holder(tiny_t3)
    restore(model)
    assert "inference" not in tiny_t3.__dict__ and not is_accelerated(model)


def test_failed_output_check_restores_and_warns(tiny_t3, monkeypatch):
    """Inject a wrong fast path (hidden states off by 10 %): the check must catch it."""
    real_forward = FastLlama.forward
    monkeypatch.setattr(FastLlama, "forward", lambda self, *a: real_forward(self, *a) * 1.1)
    model = holder(tiny_t3)
    with pytest.warns(RuntimeWarning, match="output check FAILED.*every patch was reverted"):
        report = accelerate(model)
    assert report.restored and not report.check.passed
    assert "inference" not in tiny_t3.__dict__
    assert original_tokens(tiny_t3).shape == (1, 15), "the restored model must still work"


def test_failed_output_check_raises_in_strict_mode(tiny_t3, monkeypatch):
    real_forward = FastLlama.forward
    monkeypatch.setattr(FastLlama, "forward", lambda self, *a: real_forward(self, *a) + 0.5)
    model = holder(tiny_t3)
    with pytest.raises(OutputCheckError, match="output check FAILED"):
        accelerate(model, strict=True)
    assert "inference" not in tiny_t3.__dict__


def test_an_exception_while_patching_leaves_nothing_half_patched(tiny_t3, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("injected failure in the output check")

    monkeypatch.setattr(chatterbox_accel.api, "run_output_check", boom)
    model = holder(tiny_t3)
    with pytest.raises(RuntimeError, match="injected failure"):
        accelerate(model)
    assert "inference" not in tiny_t3.__dict__ and not is_accelerated(model)


def test_bad_input_gets_clear_errors(tiny_t3):
    with pytest.raises(TypeError, match=r"expects a Chatterbox model with a \.t3.*got object"):
        accelerate(object())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fast'\]"):
        accelerate(holder(tiny_t3), fast=True)
    with pytest.raises(ValueError, match="dtype='bfloat16' needs a GPU"):
        accelerate(holder(tiny_t3), dtype="bfloat16")
    tiny_t3.train()
    with pytest.raises(ValueError, match=r"training mode; call model.t3.eval\(\)"):
        accelerate(holder(tiny_t3))
    assert "inference" not in tiny_t3.__dict__


def test_bad_sampling_options_raise_instead_of_falling_back(tiny_t3):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    t3_cond, text, _ = probe(tiny_t3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=4, temperature=0)


def test_unsupported_calls_use_the_original(tiny_t3):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    t3_cond, text, _ = probe(tiny_t3)
    fast = tiny_t3.__dict__["inference"]._self_wrapper
    init = torch.full((2, 1), tiny_t3.hp.start_speech_token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=3,
                          initial_speech_tokens=init)
    assert fast.calls == {"fast": 0, "original": 1}


def test_generate_end_to_end_matches_original_bit_for_bit(tiny_model):
    """Same seed: the accelerated generate() decodes the original's speech tokens and returns
    its audio exactly (the sampler draws as torch.multinomial does; S3Gen is untouched)."""
    with s3gen_tokens(tiny_model) as original_tokens:
        torch.manual_seed(0)
        original = tiny_model.generate("Hello there, this is a test.")
    report = accelerate(tiny_model)
    assert report.check.passed, str(report)
    with s3gen_tokens(tiny_model) as fast_tokens:
        torch.manual_seed(0)
        fast = tiny_model.generate("Hello there, this is a test.")
    assert torch.equal(fast_tokens[0], original_tokens[0])
    assert torch.equal(fast, original)


def test_suspended_runs_the_original_and_keeps_the_patches(tiny_t3):
    from chatterbox_accel.patching import get_registry

    model = holder(tiny_t3)
    accelerate(model, check=False)
    patched = tiny_t3.__dict__["inference"]
    with get_registry(model).suspended() as count:
        assert count == 1 and "inference" not in tiny_t3.__dict__
    assert tiny_t3.__dict__["inference"] is patched


def test_too_long_text_or_output_gets_a_clear_error(tiny_t3):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    t3_cond, _, _ = probe(tiny_t3)
    text = torch.randint(1, 700, (2, 2100))
    text[:, 0], text[:, -1] = 255, 0
    with pytest.raises(ValueError, match=r"text is 2098 tokens long.*split it into sentences"):
        tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=4)
    _, short, _ = probe(tiny_t3)
    with pytest.raises(ValueError, match=r"max_new_tokens=5000 is outside 1..4096"):
        tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=short, max_new_tokens=5000)

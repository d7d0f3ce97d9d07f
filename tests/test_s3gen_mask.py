"""S3Gen's CFM estimator without its all-zero attention bias (s3gen.SkipEmptyMask): bit-exact,
real masks untouched, a failure falls back to the bias, restore() unwraps every block."""
import types

import torch
from chatterbox.models.s3gen.matcha.transformer import BasicTransformerBlock

from chatterbox_accel import accelerate, restore
from chatterbox_accel.patching import PatchRegistry
from chatterbox_accel.s3gen import estimator_of, probe_args, skip_empty_masks


def holder_with(estimator):
    flow = types.SimpleNamespace(decoder=types.SimpleNamespace(estimator=estimator))
    return types.SimpleNamespace(s3gen=types.SimpleNamespace(flow=flow))


def run(estimator, args):
    with torch.inference_mode():
        return estimator(**args)


def test_same_output_bit_for_bit_and_a_real_mask_is_kept(tiny_model):
    estimator = estimator_of(tiny_model)
    full = probe_args(estimator, 120)  # CFG batch 2, one utterance: full attention, zero bias
    padded = probe_args(estimator, 120)
    padded["mask"][1, :, 100:] = 0  # a padded row: a real bias, to be passed on
    want = [run(estimator, full), run(estimator, padded)]  # before any wrapping
    registry = PatchRegistry()
    wrapper = skip_empty_masks(holder_with(estimator), registry)
    blocks = [m for m in estimator.modules() if isinstance(m, BasicTransformerBlock)]
    try:
        assert torch.equal(run(estimator, full), want[0])
        assert wrapper.calls == {"dropped": len(blocks), "kept": 0} and len(blocks) == 56
        assert torch.equal(run(estimator, padded), want[1])
        assert wrapper.calls == {"dropped": len(blocks), "kept": len(blocks)}
    finally:
        registry.revert()
    assert all("forward" not in b.__dict__ for b in blocks)


def test_a_failure_without_the_bias_keeps_the_bias_from_then_on(tiny_model, monkeypatch):
    estimator = estimator_of(tiny_model)
    args = probe_args(estimator, 64)
    want = run(estimator, args)
    real = BasicTransformerBlock.forward

    def needs_a_mask(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is None:
            raise RuntimeError("injected: no mask")
        return real(self, hidden_states, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(BasicTransformerBlock, "forward", needs_a_mask)
    registry = PatchRegistry()
    wrapper = skip_empty_masks(holder_with(estimator), registry)
    try:
        assert torch.equal(run(estimator, args), want)
        assert "injected: no mask" in wrapper.disabled and wrapper.calls["dropped"] == 0
    finally:
        registry.revert()


def test_accelerate_applies_it_and_generate_gives_the_same_audio(tiny_model):
    torch.manual_seed(0)
    tokens = torch.randint(0, 6561, (20,))
    ref = tiny_model.conds.gen

    def audio():
        torch.manual_seed(1)
        with torch.inference_mode():
            return tiny_model.s3gen.inference(speech_tokens=tokens, ref_dict=ref)[0]

    want = audio()
    report = accelerate(tiny_model, check=False)
    assert "s3gen.skip_empty_mask" in report.applied
    assert torch.equal(audio(), want)
    assert accelerate(tiny_model, check=False, s3gen_skip_empty_mask=False).applied.count("s3gen.skip_empty_mask") == 0
    restore(tiny_model)
    assert not any("forward" in m.__dict__ for m in estimator_of(tiny_model).modules())

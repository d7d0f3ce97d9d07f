"""Multilingual T3: the fast loop with chatterbox's alignment analyzer, vs the original loop.

The T3 here has the multilingual vocabulary and 14 full-width layers (the analyzer reads heads
of layers 9, 12 and 13) with a narrow MLP, random weights. The original `T3.inference` runs the
analyzer on eager attention maps taken by forward hooks; the fast loop runs the same analyzer
class on maps computed for those three heads only. A spy on `AlignmentStreamAnalyzer.step`
records, for both, the alignment matrix the analyzer built and what it did to the EOS logit.
"""
import pytest
import torch
from chatterbox.models.t3.inference import alignment_stream_analyzer as asa

import chatterbox_accel.t3.model as fast_model
from chatterbox_accel import accelerate, restore
from chatterbox_accel.api import fast_inference_of
from chatterbox_accel.checkpoints import tiny_t3
from conftest import fresh, holder, probe

EOS = 6562


def mtl_t3(stop_after=None, seed=0):
    return tiny_t3(seed=seed, layers=14, multilingual=True, intermediate_size=1024, stop_after=stop_after)


@pytest.fixture(scope="module")
def t3():
    return mtl_t3(stop_after=12)


@pytest.fixture
def analyzer_steps(monkeypatch):
    """Per analyzer step: (alignment so far, token it was told about, EOS forced, EOS suppressed)."""
    steps = []
    original = asa.AlignmentStreamAnalyzer.step

    def spy(self, logits, next_token=None):
        out = original(self, logits, next_token)
        eos = out[0, self.eos_idx].item()
        steps.append((self.alignment.clone(), next_token, eos == 2**15, eos == -(2**15)))
        return out

    monkeypatch.setattr(asa.AlignmentStreamAnalyzer, "step", spy)
    return steps


def original_run(t3, seed, **kwargs):
    """The untouched T3.inference, on a copy of the attention config it would switch to eager."""
    saved = t3.tfmr.config._attn_implementation
    t3_cond, text, _ = probe(t3)
    torch.manual_seed(seed)
    try:
        return type(t3).inference(t3, t3_cond=fresh(t3_cond), text_tokens=text, **kwargs)
    finally:
        undo_upstream_switch(t3, saved)


def upstream_hooks(t3):
    """The analyzer's forward hooks upstream leaves on the layers (transformers' own output
    capturing hooks have another name)."""
    return [(layer.self_attn._forward_hooks, key) for layer in t3.tfmr.layers
            for key, hook in layer.self_attn._forward_hooks.items()
            if hook.__name__ == "attention_forward_hook"]


def undo_upstream_switch(t3, attention):
    """Undo the original loop's permanent eager switch and its hooks (see t3/alignment.py)."""
    t3.tfmr.config._attn_implementation = attention
    for hooks, key in upstream_hooks(t3):
        del hooks[key]


def fast_run(t3, seed, **kwargs):
    model = holder(t3)
    report = accelerate(model, check=False)
    assert "t3.static_kv_cache" in report.applied and "t3" not in report.fallbacks
    t3_cond, text, _ = probe(t3)
    torch.manual_seed(seed)
    try:
        return t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, **kwargs)
    finally:
        restore(model)


@pytest.mark.parametrize("temperature", [0.8, 1e-6])
def test_same_tokens_and_same_analyzer_decisions_as_the_original(t3, analyzer_steps, temperature):
    kwargs = dict(max_new_tokens=40, temperature=temperature, repetition_penalty=2.0, top_p=1.0)
    original = original_run(t3, 3, **kwargs)
    ref_steps = list(analyzer_steps)
    analyzer_steps.clear()
    fast = fast_run(t3, 3, **kwargs)
    assert fast.tolist() == original.tolist()
    assert len(analyzer_steps) == len(ref_steps) == fast.shape[1]
    # The EOS the shaped head would emit from token 12 on is held back while the alignment says
    # the text is not spoken yet: the analyzer acted, in both runs, at the same steps.
    assert any(suppressed for *_, suppressed in ref_steps)
    for (a_ref, tok_ref, forced_ref, sup_ref), (a, tok, forced, sup) in zip(ref_steps, analyzer_steps):
        assert (tok, forced, sup) == (tok_ref, forced_ref, sup_ref)
        assert a.shape == a_ref.shape and (a - a_ref).abs().max() < 1e-5


def test_forced_eos_on_repetition_like_the_original(analyzer_steps):
    """A head that always picks one token: after it repeats, the analyzer forces EOS."""
    t3 = mtl_t3(seed=1)
    with torch.no_grad():  # every speech position carries a direction d that token 123's row reads
        d = torch.nn.functional.normalize(torch.randn(t3.dim, generator=torch.Generator().manual_seed(5)), dim=0)
        t3.speech_pos_emb.emb.weight += 100.0 * d
        t3.speech_head.weight[123] = 0.3 * d
    kwargs = dict(max_new_tokens=30, temperature=0.8, repetition_penalty=1.0, top_p=1.0)
    original = original_run(t3, 0, **kwargs)
    assert analyzer_steps[-1][2], "the original analyzer forced EOS"
    analyzer_steps.clear()
    fast = fast_run(t3, 0, **kwargs)
    assert analyzer_steps[-1][2]
    assert fast.tolist() == original.tolist() == [[123, 123, EOS]]


def test_output_check_compares_the_alignment_maps_and_fails_on_wrong_ones(t3, monkeypatch):
    model = holder(t3)
    report = accelerate(model)
    assert report.check.passed and report.check.attention_diff < 1e-5
    assert "alignment attention" in str(report.check)
    restore(model)

    def shifted(q, keys, input_pos):  # a map one position off: logits are untouched
        return torch.roll(right(q, keys, input_pos), 1, dims=-1)

    right = fast_model.attention_map
    monkeypatch.setattr(fast_model, "attention_map", shifted)
    with pytest.warns(RuntimeWarning, match="output check"):
        report = accelerate(model)
    assert report.restored and not report.check.passed and report.check.attention_diff > 1e-3
    assert report.check.rel_diff < 1e-5  # the logits alone would have passed
    assert t3.inference.__func__ is type(t3).inference


def test_model_attention_setting_and_hooks_are_left_alone(t3):
    config = t3.tfmr.config
    before = config._attn_implementation
    fast_run(t3, 0, max_new_tokens=5)
    assert config._attn_implementation == before != "eager"
    assert not upstream_hooks(t3)


def test_analyzer_failure_at_run_time_falls_back_to_the_original(t3, monkeypatch):
    from chatterbox_accel.t3 import alignment

    kwargs = dict(max_new_tokens=8, temperature=1e-6, top_p=1.0)
    expected = original_run(t3, 0, **kwargs)
    attention = t3.tfmr.config._attn_implementation
    model = holder(t3)
    accelerate(model, check=False)

    def broken(self, logits):
        raise RuntimeError("injected: analyzer feed failed")

    monkeypatch.setattr(alignment.AnalyzerFeed, "__call__", broken)
    t3_cond, text, _ = probe(t3)
    try:
        out = t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, **kwargs)
        fast = fast_inference_of(model)
        assert "injected: analyzer feed failed" in fast.disabled
        assert fast.calls == {"fast": 0, "original": 1}
    finally:
        restore(model)
        undo_upstream_switch(t3, attention)
    assert out.tolist() == expected.tolist()

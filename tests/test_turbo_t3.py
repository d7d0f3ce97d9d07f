"""Turbo T3 (GPT-2): the fast `inference_turbo` vs the original, same weights and seed.

A 2-layer full-width Turbo T3 with random weights. On CPU, `torch.multinomial` draws the way the
fast sampler's exponential race does, so under one seed both sample the same tokens whenever
their logits agree to rounding: the tests compare token lists exactly.
"""
import dataclasses

import pytest
import torch

from chatterbox_accel import accelerate, restore
from chatterbox_accel.api import fast_inference_of, runner_of
from chatterbox_accel.check import probe_inputs
from chatterbox_accel.checkpoints import tiny_turbo_t3
from conftest import holder

EOS = 6562


@pytest.fixture(scope="module")
def t3():
    # the probe voice has 375 prompt tokens (as a >= 15 s reference gives): EOS after ~30 text +
    # speech tokens, i.e. ~18 speech tokens for the 12-token probe text
    return tiny_turbo_t3(layers=2, stop_after=30, prompt_tokens=375)


def voice(t3, seed=1234):
    conds, _, _ = probe_inputs(t3, None, 1, 0.0)
    if seed != 1234:
        g = torch.Generator().manual_seed(seed)
        conds = dataclasses.replace(conds, speaker_emb=torch.randn(conds.speaker_emb.shape, generator=g))
    return conds


def text_of(t3):
    return probe_inputs(t3, None, 1, 0.0)[1][:1]


def original(t3, seed=0, conds=None, **kwargs):
    torch.manual_seed(seed)
    conds = conds or voice(t3)
    return type(t3).inference_turbo(t3, t3_cond=dataclasses.replace(conds, cond_prompt_speech_emb=None),
                                    text_tokens=text_of(t3), **kwargs)


def fast(t3, seed=0, conds=None, **kwargs):
    torch.manual_seed(seed)
    conds = conds or voice(t3)
    return t3.inference_turbo(t3_cond=dataclasses.replace(conds, cond_prompt_speech_emb=None),
                              text_tokens=text_of(t3), **kwargs)


@pytest.fixture
def accelerated(t3):
    # every product on the oneDNN-packed kernel (pinned: on a CPU where plain measures faster,
    # auto would leave the kernel table empty and these tests would not cover it)
    model = holder(t3)
    report = accelerate(model, cpu_kernel="onednn")
    yield model, report
    restore(model)


@pytest.mark.parametrize("options", [
    dict(),  # generate()'s defaults: temperature 0.8, top_k 1000, top_p 0.95, penalty 1.2
    dict(temperature=1e-6, top_k=50),
    dict(temperature=0.8, top_k=0, top_p=1.0, repetition_penalty=1.0),  # every processor off
    dict(temperature=1.0, top_k=5, top_p=0.5, repetition_penalty=2.0),
    dict(temperature=0.0),  # upstream skips the temperature warper for t <= 0
    dict(max_gen_len=0),  # one token
])
def test_same_tokens_as_the_original(t3, accelerated, options):
    options = {"max_gen_len": 40, **options}
    expected = original(t3, **options)
    assert fast(t3, **options).tolist() == expected.tolist()
    assert expected.shape[1] == 1 if options["max_gen_len"] == 0 else 10 < expected.shape[1] < 40
    assert fast_inference_of(accelerated[0]).calls["fast"] == 1


def test_report_and_output_check(accelerated):
    _, report = accelerated
    assert "t3.static_kv_cache" in report.applied and "t3" not in report.fallbacks
    # the GPT-2 projections and the speech head run on the pinned kernel's copies (kernels.py)
    assert "t3.cpu_kernels" in report.applied and len(runner_of(accelerated[0]).gpt2.kernels.entries) == 4 * 2 + 1
    assert report.check.passed and report.check.rel_diff < 1e-5


def test_auto_kernels_and_int8_weights(t3):
    model = holder(t3)
    report = accelerate(model)  # measured: whichever float32 kernel is fastest here
    assert report.kernels.decode in ("plain", "gemv", "onednn") and report.check.rel_diff < 1e-5
    assert fast(t3, max_gen_len=20).tolist() == original(t3, max_gen_len=20).tolist()
    report = accelerate(model, precision="int8", cpu_kernel="int8pack")
    assert report.check.passed and report.check.precision == "int8", str(report)
    assert len(runner_of(model).gpt2.kernels.entries) == 4 * 2 + 1
    restore(model)


def test_stops_at_eos_and_drops_it_like_the_original(t3, accelerated):
    expected = original(t3, max_gen_len=200)
    out = fast(t3, max_gen_len=200)
    assert out.tolist() == expected.tolist()
    assert 5 < out.shape[1] < 200 and EOS not in out.tolist()[0]  # the shaped head stopped it


def test_an_eos_sampled_first_does_not_stop_it_as_upstream():
    t3 = tiny_turbo_t3(layers=2, prompt_tokens=150, seed=3)
    with torch.no_grad():
        t3.speech_head.bias[EOS] = 50.0  # EOS every time
    expected = original(t3, max_gen_len=10)
    model = holder(t3)
    accelerate(model)
    try:
        assert fast(t3, max_gen_len=10).tolist() == expected.tolist() == [[EOS]]
    finally:
        restore(model)


def test_voice_prefix_is_reused_and_invalidated_exactly(t3, accelerated, monkeypatch):
    """The voice's conditioning prefix runs once per voice (a few voices are kept): a call with a
    known voice runs only its text and BOS positions, with the original's tokens every time."""
    runner = runner_of(accelerated[0])
    fed = []
    forward = runner.gpt2.forward
    monkeypatch.setattr(runner.gpt2, "forward", lambda x, *a: fed.append(x.shape[1]) or forward(x, *a))
    runner.prefixes.clear()
    a, b = voice(t3, seed=7), voice(t3, seed=8)
    prompt_lengths = []
    for conds in (a, a, b, b, a):
        fed.clear()
        out = fast(t3, conds=conds, max_gen_len=20)
        prompt_lengths.append(fed[:2])
        assert out.tolist() == original(t3, conds=conds, max_gen_len=20).tolist()
    text_and_bos = text_of(t3).shape[1] + 1
    prefix = 1 + 375  # speaker + voice prompt tokens
    # a new voice: its prefix, then text + BOS; a known one (a is still kept at the 5th call): text + BOS
    new, known = [prefix, text_and_bos], [text_and_bos, 1]
    assert prompt_lengths == [new, known, new, known, known]


def test_bad_options_raise_before_work(t3, accelerated):
    with pytest.raises(ValueError, match="top_k must be an integer"):
        fast(t3, top_k=5.5)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        fast(t3, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="max_gen_len"):
        fast(t3, max_gen_len=-1)


def test_wrong_forward_fails_the_output_check_and_restores(t3, monkeypatch):
    import chatterbox_accel.t3.turbo as turbo

    right = turbo.FastGPT2.conv1d  # every projection, packed (CPU) or plain
    monkeypatch.setattr(turbo.FastGPT2, "conv1d", lambda self, module, x: right(self, module, x) * 1.01)
    model = holder(t3)
    with pytest.warns(RuntimeWarning, match="output check"):
        report = accelerate(model)
    assert report.restored and not report.check.passed
    assert "inference_turbo" not in t3.__dict__


def test_run_time_failure_falls_back_to_the_original(t3, accelerated, monkeypatch):
    runner = runner_of(accelerated[0])

    def broken(*args, **kwargs):
        raise RuntimeError("injected: GPT-2 step failed")

    monkeypatch.setattr(runner, "token_blocks", broken)
    expected = original(t3, max_gen_len=10)
    assert fast(t3, max_gen_len=10).tolist() == expected.tolist()
    wrapper = fast_inference_of(accelerated[0])
    assert "injected" in wrapper.disabled and wrapper.calls["original"] == 1


def test_rows_in_a_batch_decode_as_they_would_alone(t3, accelerated):
    """Guards Turbo's per-row decoder state (GPT-2 positions, options as per-row tensors, the
    first-token penalty rule, the voice prefix per slot): three requests with two voices,
    different options and seeds, through 2 slots (the third joins mid-decode), each give the
    tokens that request gives alone."""
    from chatterbox_accel.t3.turbo import TurboParams

    runner = runner_of(accelerated[0])

    def req(conds, seed, max_gen_len, **opts):
        params = TurboParams.make(**{**dict(temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2),
                                     **opts})
        with torch.inference_mode():
            return runner.request(dataclasses.replace(conds, cond_prompt_speech_emb=None), text_of(t3), params,
                                  max_gen_len, torch.Generator().manual_seed(seed), key=seed)

    specs = [(voice(t3, 7), 1, 30, {}), (voice(t3, 8), 2, 12, dict(top_k=5, temperature=1.0)),
             (voice(t3, 7), 3, 25, dict(top_p=1.0, repetition_penalty=1.0))]
    runner.claim()
    batched = {r.key: t for r, t in runner.decoder(2).run([req(c, s, m, **o) for c, s, m, o in specs])}
    lengths = []
    for conds, seed, max_gen_len, opts in specs:
        runner.claim()
        alone = [t for _, t in runner.decoder(1).run([req(conds, seed, max_gen_len, **opts)])][0]
        assert torch.equal(batched[seed], alone), seed
        lengths.append(alone.numel())
    assert min(lengths) > 5  # real decodes, not a first-token stop

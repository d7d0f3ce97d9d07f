"""S3Gen fast modes (s3gen_fast.py): each lever against upstream's own code with the same
setting, the probe check and its refusal, presets, restore(). A 2-layer T3 English model with
the small S3Gen estimator of the test models (upstream's ConditionalDecoder with 1 + 1 blocks; the
rest of S3Gen full size, random) and its 1 s built-in voice."""
import pytest
import torch

import chatterbox_accel.s3gen_fast as s3gen_fast
from chatterbox_accel import accelerate, restore
from chatterbox_accel.config import AccelConfig
from chatterbox_accel.s3gen_fast import S3GenModes, compare_mels, mel_probe

TOKENS = ((torch.arange(30) * 797 + 11) % 6561)[None]


def mel(model, ref=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.s3gen.flow_inference(TOKENS, ref_dict=ref or model.conds.gen, finalize=True, **kwargs)


def long_ref(model, seconds=4):
    """A reference of `seconds` (random prompt tokens and mel; the model's x-vector)."""
    g = torch.Generator().manual_seed(3)
    n = int(25 * seconds)
    return {**model.conds.gen, "prompt_token": torch.randint(0, 6561, (1, n), generator=g),
            "prompt_token_len": torch.tensor([n]), "prompt_feat": torch.randn(1, 2 * n, 80, generator=g) - 5,
            "prompt_feat_len": torch.tensor([2 * n])}


def test_steps_are_upstreams_n_cfm_timesteps(tiny_model):
    expected = mel(tiny_model, n_cfm_timesteps=4)
    accelerate(tiny_model, t3=False, s3gen_steps=4)
    try:
        assert torch.equal(mel(tiny_model), expected)
    finally:
        restore(tiny_model)
    assert not torch.equal(mel(tiny_model), expected)  # restored: upstream's 10 steps again


def test_no_cfg_is_upstreams_solver_with_guidance_zero(tiny_model, monkeypatch):
    cfm = tiny_model.s3gen.flow.decoder
    with monkeypatch.context() as m:
        m.setattr(cfm, "inference_cfg_rate", 0.0)  # upstream: dxdt = 1.0 cond - 0.0 uncond
        expected = mel(tiny_model)
    exact = mel(tiny_model)
    accelerate(tiny_model, t3=False, s3gen_cfg=False)
    try:
        got = mel(tiny_model)
    finally:
        restore(tiny_model)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale  # batch 1 vs 2 in the estimator: rounding only
    assert (exact - expected).abs().max() > 1e-2 * scale  # ... while guidance really changes the mel


def test_prompt_cap_keeps_the_last_seconds_of_the_reference(tiny_model, monkeypatch):
    ref = long_ref(tiny_model, 4)
    cut = S3GenModes(prompt_seconds=2).cap(ref)
    assert cut["prompt_token"].shape == (1, 50) and cut["prompt_feat"].shape == (1, 100, 80)
    assert torch.equal(cut["prompt_token"], ref["prompt_token"][:, -50:]) and int(cut["prompt_feat_len"]) == 100
    estimator = tiny_model.s3gen.flow.decoder.estimator
    seen = []

    def still(x, mask, mu, t, spks=None, cond=None, r=None):  # dx/dt = 0: the output is the noise
        seen.append(cond.clone())
        return torch.zeros_like(x)

    monkeypatch.setattr(estimator, "forward", still)
    exact = mel(tiny_model, dict(ref))  # the noise of the new frames, as upstream draws it
    accelerate(tiny_model, t3=False, s3gen_prompt_seconds=2)
    try:
        seen.clear()
        capped = mel(tiny_model, dict(ref))
    finally:
        restore(tiny_model)
    assert seen[0].shape[-1] == 100 + 60  # the estimator saw the cut prompt (2 s) + 30 tokens
    assert torch.equal(seen[0][0, :, :100], cut["prompt_feat"][0].t().to(seen[0].dtype))
    assert torch.equal(capped, exact)  # ... and each new frame got the exact path's noise


# Measured on this test model (30 tokens, 1 s voice, seed 0, small estimator), 2-core AMD EPYC
# (AVX2), torch 2.6.0: relative L2 of the mel vs exact: bf16 estimator 0.0062, 5 steps 0.150 (CFG
# off 0.274: see the test above for what it equals). With the full estimator on an Intel Xeon (AMX):
# 0.0099 and 0.134. The bounds: a factor 2.5 below the smaller figure and above the larger.
@pytest.mark.parametrize("options,low,high", [
    (dict(s3gen_dtype="bfloat16"), 0.0025, 0.025),
    (dict(s3gen_steps=5), 0.05, 0.375),
])
def test_deviation_of_each_mode_within_measured_bounds(tiny_model, options, low, high, monkeypatch):
    # accelerate()'s own probe at 10 tokens, not 50: bf16 autocast is emulated on a CPU without
    # bf16 instructions (~110 s at 50 on an AVX2 EPYC); the deviation is judged below, at 30
    monkeypatch.setattr(s3gen_fast, "PROBE_TOKENS", 10)
    exact = mel(tiny_model)
    report = accelerate(tiny_model, t3=False, **options)
    try:
        rel, cos = compare_mels(mel(tiny_model), exact)
    finally:
        restore(tiny_model)
    assert report.s3gen_check.passed, str(report)
    assert low < rel < high, (rel, cos)


def test_a_mode_bundle_over_the_limit_is_refused_with_the_figures(tiny_model, monkeypatch):
    monkeypatch.setattr(s3gen_fast, "MEL_LIMIT", 1e-9)
    report = accelerate(tiny_model, s3gen_steps=3, s3gen_cfg=False)
    try:
        assert "S3Gen mode check FAILED" in report.fallbacks["s3gen.modes"]
        assert "mel relative L2" in report.fallbacks["s3gen.modes"]
        # no mode applied; the default batch kernels' gate is another option's, and stays
        assert [name for name in report.applied if name.startswith("s3gen.")] == ["s3gen.kernel.batch"]
        assert "forward" not in tiny_model.s3gen.flow.decoder.__dict__  # nothing of the modes left on
        assert "t3.static_kv_cache" in report.applied  # the rest of accelerate() stands
    finally:
        restore(tiny_model)


def test_restore_removes_every_mode(tiny_model, monkeypatch):
    monkeypatch.setattr(s3gen_fast, "PROBE_TOKENS", 8)  # the check's probe is not this test's subject
    exact = mel(tiny_model)
    accelerate(tiny_model, t3=False, s3gen_steps=3, s3gen_cfg=False, s3gen_prompt_seconds=1.0,
               s3gen_dtype="bfloat16")
    restore(tiny_model)
    flow = tiny_model.s3gen.flow
    for obj, attr in ((flow.decoder, "forward"), (flow.decoder, "solve_euler"), (flow, "inference"),
                      (flow.decoder.estimator, "forward")):
        assert attr not in obj.__dict__
    assert torch.equal(mel(tiny_model), exact)


def test_presets_and_explicit_options():
    fast = AccelConfig.from_options(preset="fast")
    assert fast.precision == "int8" and fast.s3gen_modes.active
    assert AccelConfig.from_options(preset="fast", s3gen_steps=8, precision="float32").s3gen_steps == 8
    assert not AccelConfig.from_options().s3gen_modes.active  # exact: nothing that changes the output
    # the preset's bf16 estimator only where bf16 is native: the rule, on both kinds of CPU
    assert fast.s3gen_dtype == "auto" and fast.s3gen_modes_on("cuda").dtype == "bfloat16"
    from chatterbox_accel import config as config_module
    from chatterbox_accel.t3 import kernels

    for flags, want in (({"avx2", "fma"}, "float32"), ({"avx2", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16")):
        original = kernels.cpu_features
        kernels.cpu_features = lambda flags=flags: flags
        try:
            assert fast.s3gen_modes_on("cpu").dtype == want, flags
            assert config_module.native_bf16("cpu") == (want == "bfloat16")
        finally:
            kernels.cpu_features = original
    assert AccelConfig.from_options(preset="fast", s3gen_dtype="bfloat16").s3gen_modes_on("cpu").dtype == "bfloat16"
    with pytest.raises(ValueError, match="preset='quick' is not valid"):
        AccelConfig.from_options(preset="quick")
    with pytest.raises(ValueError, match="s3gen_prompt_seconds=0.5"):
        AccelConfig.from_options(s3gen_prompt_seconds=0.5)
    with pytest.raises(ValueError, match="s3gen_steps=0"):
        AccelConfig.from_options(s3gen_steps=0)


def test_the_stream_uses_the_modes(tiny_model):
    accelerate(tiny_model, s3gen_steps=3, s3gen_cfg=False)
    try:
        torch.manual_seed(0)
        chunks = list(tiny_model.generate_stream("Hi there.", chunk_size=8, first_chunk_size=8))
        assert chunks and chunks[-1][1].final
        assert s3gen_fast.modes_of(tiny_model).steps == 3
    finally:
        restore(tiny_model)


def test_mel_probe_leaves_the_global_rng_alone(tiny_model):
    state = torch.random.get_rng_state()
    mel_probe(tiny_model, tiny_model.conds.gen)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_preset_is_never_dropped_silently():
    with pytest.raises(ValueError, match=r"built directly does not apply the preset"):
        AccelConfig(preset="fast")

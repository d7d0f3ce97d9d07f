import pytest

from chatterbox_accel import AccelConfig


def test_defaults_are_valid():
    cfg = AccelConfig()
    assert cfg.t3 and cfg.static_cache and cfg.check and not cfg.strict
    assert cfg.resolved_tolerance() == 1e-3
    assert AccelConfig(dtype="bfloat16").resolved_tolerance() == 5e-2


def test_unknown_option_names_the_option_and_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['compiel'\].*allowed options.*compile"):
        AccelConfig.from_options({"compiel": True})


@pytest.mark.parametrize("key,value,match", [
    ("attention", "xformers", r"attention='xformers'.*allowed values.*sdpa"),
    ("compile_mode", "fast", r"compile_mode='fast'.*reduce-overhead"),
    ("dtype", "int8", r"dtype='int8'.*bfloat16"),
    ("compile_targets", ("t3", "vocoder"), r"compile_targets='vocoder'.*allowed values: \['t3', 's3gen'\]"),
    ("compile", "yes", r"compile='yes' must be True or False"),
    ("kv_bucket", 0, r"kv_bucket=0 must be a positive integer"),
    ("eos_check_every", 2.5, r"eos_check_every=2.5 must be a positive integer"),
    ("check_tolerance", -1, r"check_tolerance must be a positive number"),
])
def test_bad_values_raise_with_the_option_name(key, value, match):
    with pytest.raises(ValueError, match=match):
        AccelConfig.from_options({key: value})


def test_compile_targets_accepts_a_single_string():
    assert AccelConfig(compile_targets="t3").compile_targets == ("t3",)


def test_device_dependent_defaults():
    cfg = AccelConfig()
    assert cfg.wants_compile("cuda") and not cfg.wants_compile("cpu")
    assert cfg.wants_cuda_graphs("cuda") and not cfg.wants_cuda_graphs("cpu")
    assert not AccelConfig(cuda_graphs=True).wants_cuda_graphs("cpu")


def test_an_untested_chatterbox_version_runs_only_what_a_check_verifies(tiny_model, monkeypatch):
    import chatterbox_accel.versions as versions
    from chatterbox_accel import accelerate, restore

    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: "0.1.9" if p == "chatterbox-tts" else real(p))
    report = accelerate(tiny_model)  # checked: the T3 loop is verified, so it stays
    try:
        assert report.versions["chatterbox-tts"] == "0.1.9" and "untested  chatterbox-tts 0.1.9" in str(report)
        assert report.check.passed and "t3.static_kv_cache" in report.applied
        assert "chatterbox-tts 0.1.9 is installed" in report.fallbacks["generate_stream"]
        assert "generate_stream" not in tiny_model.__dict__
    finally:
        restore(tiny_model)
    report = accelerate(tiny_model, check=False, s3gen_steps=5)
    try:
        assert "the fast T3 loop mirrors chatterbox-tts 0.1.7" in report.fallbacks["t3"]
        assert "inference" not in tiny_model.t3.__dict__
        assert "check=True" in report.fallbacks["s3gen.modes"]
    finally:
        restore(tiny_model)
    monkeypatch.setattr(versions, "installed", real)
    assert "chatterbox-tts" not in accelerate(tiny_model).versions and "generate_stream" in tiny_model.__dict__
    restore(tiny_model)

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

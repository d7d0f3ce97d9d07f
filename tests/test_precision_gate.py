"""Reduced precision judged on a checkpoint that behaves like a trained one (issue 22): the
realistic test checkpoint (peaked logits, outlier channels), the gate on what sampling sees, and
the one-step fallback (next kernel of the precision, then the exact fast path). Kernel choices
that depend on the machine are pinned or their timings injected: these tests test what the
choice does and the rule, not which kernel wins on this CPU."""
import pytest
import torch

import chatterbox_accel.check as check
import chatterbox_accel.t3.kernels as kernels
import chatterbox_accel.t3.model as fast_model
from chatterbox_accel import accelerate, restore
from chatterbox_accel.api import runner_of
from chatterbox_accel.checkpoints import tiny_t3
from chatterbox_accel.realistic import DEFAULT_ENTROPY, probe_entropy, probe_logits

from conftest import holder
from test_kernels import fast_tokens, original_tokens


@pytest.fixture(scope="module")
def realistic_state():
    t3 = tiny_t3(seed=0, layers=2, realistic=DEFAULT_ENTROPY)
    return {k: v.clone() for k, v in t3.state_dict().items()}


@pytest.fixture
def realistic(realistic_state):
    """A fresh 2-layer realistic T3 (the module's calibrated weights, copied in)."""
    t3 = tiny_t3(seed=0, layers=2)
    t3.load_state_dict(realistic_state)
    return t3


def reduced_faster(monkeypatch):
    """Inject timings: every reduced kernel measures faster than plain float32 (fbgemm-int8
    fastest of the int8 ones), so the gate, not this CPU, decides what runs."""
    order = {"plain": 10.0, "gemv": 12.0, "onednn": 11.0, "bf16": 6.0, "onednn-bf16": 5.0,
             "fbgemm-int8": 3.0, "int8pack": 4.0, "int4pack": 2.0}
    monkeypatch.setattr(kernels, "time_kernel", lambda name, *a: {
        "decode": order[name] / 1e3, "batch": 2 * order[name] / 1e3, "prefill": 10.0 / 1e3})


def runs_reduced(monkeypatch, t3, kernel: str) -> None:
    """Decode with plain F.linear forbidden: every product must go through `kernel`'s copies."""
    def unplain(*args):
        raise AssertionError("a T3 product ran on the plain kernel")

    table = runner_of_t3(t3).backbone.kernels
    assert table.decode.name == kernel and table.single in (None, table.decode)
    with monkeypatch.context() as m:
        m.setattr(fast_model, "linear", unplain)
        fast_tokens(t3)


def runner_of_t3(t3):
    return t3.__dict__["inference"]._self_wrapper.runner


def test_the_realistic_checkpoint_is_peaked_and_has_outlier_channels(realistic):
    flat = tiny_t3(seed=0, layers=2)
    assert probe_entropy(probe_logits(flat)) > 8.0  # the random head: nearly uniform over 8194 ids
    assert abs(probe_entropy(probe_logits(realistic)) - DEFAULT_ENTROPY) < 0.05
    norm = realistic.tfmr.layers[0].input_layernorm.weight
    assert norm.max() >= 9 * norm.median()  # a few channels ~10x the rest


def test_the_gate_measures_what_sampling_sees():
    logits = torch.zeros(2, 100)
    logits[:, 7] = 5.0
    assert check.compare(logits, logits, 1e-3, "int8").tv_mean == 0.0
    moved = logits.clone()
    moved[:, 7], moved[:, 8] = 0.0, 5.0  # the favourite changes: most of the mass moves
    result = check.compare(moved, logits, 1e-3, "int8")
    assert result.tv_mean > 0.9 and not result.passed
    below = logits.clone()
    below[:, 50] = -3.0  # a token min_p removes in both: sampling cannot see it
    assert check.compare(below, logits, 1e-3, "int8").tv_mean < 1e-6


@pytest.mark.parametrize("precision,kernel", [("bfloat16", "bf16"), ("int8", "int8pack")])
def test_reduced_precision_passes_the_gate_on_realistic_logits_and_runs(realistic, monkeypatch, precision, kernel):
    model = holder(realistic)
    report = accelerate(model, precision=precision, cpu_kernel=kernel)
    try:
        why = report.fallbacks.get("t3.cpu_kernels", "")
        if "needs the cpu support" in why:
            pytest.skip(f"{kernel} is not supported by this CPU ({why})")
        assert report.check.passed and report.check.precision == precision, str(report)
        assert f"t3.precision.{precision}" in report.applied and report.check.rel_diff > 1e-4
        print(f"{precision} {kernel}: {report.check}")  # pytest -s shows the gate's figures
        runs_reduced(monkeypatch, realistic, kernel)
    finally:
        restore(model)


def test_auto_int8_runs_what_passes_the_gate(realistic, monkeypatch):
    """The fastest int8 kernel is tried first; whichever runs, it passed the gate, the report
    names it in applied and kernels, and any kernel tried before it is listed as refused."""
    reduced_faster(monkeypatch)
    model = holder(realistic)
    report = accelerate(model, precision="int8")
    try:
        assert report.check.passed and report.check.precision == "int8", str(report)
        runs = runner_of(model).backbone.kernels.decode.name
        assert runs == report.kernels.decode and "t3.precision.int8" in report.applied
        assert [name for name, _ in report.refused] == ([] if runs == "fbgemm-int8" else ["fbgemm-int8"])
    finally:
        restore(model)


def test_kernels_refused_one_by_one_then_the_exact_fast_path(realistic, monkeypatch):
    reduced_faster(monkeypatch)
    monkeypatch.setitem(check.PRECISION_LIMITS, "int8", check.PrecisionLimits(argmax=1.0, tv_mean=0.0, tv_max=0.0))
    model = holder(realistic)
    report = accelerate(model, precision="int8")
    try:
        assert [name for name, _ in report.refused] == ["fbgemm-int8", "int8pack"]
        assert report.ok and report.check.passed and report.check.precision == "float32", str(report)
        assert not any(a.startswith("t3.precision") for a in report.applied)
        assert "t3.device_sampler" in report.applied and report.kernels.precision == "float32"
        assert fast_tokens(realistic).tolist() == original_tokens(realistic).tolist()
    finally:
        restore(model)


def test_int4_passes_or_is_refused_with_its_figures_while_the_exact_path_stays(realistic):
    model = holder(realistic)
    report = accelerate(model, precision="int4", cpu_kernel="int4pack")
    try:
        print(report)
        assert report.ok and report.check.passed
        if "t3.precision.int4" in report.applied:
            assert report.check.precision == "int4"
        else:
            assert report.check.precision == "float32" and "t3.device_sampler" in report.applied
            assert "int4pack refused by the output check" in report.fallbacks["t3.precision"]
            assert "sampling TV mean" in report.fallbacks["t3.precision"]
    finally:
        restore(model)


def test_preset_fast_keeps_a_reduced_t3_on_realistic_logits(realistic, monkeypatch):
    reduced_faster(monkeypatch)
    model = holder(realistic)
    report = accelerate(model, preset="fast")
    try:
        assert "t3.precision.int8" in report.applied and report.check.passed, str(report)
        assert report.check.precision == "int8"
    finally:
        restore(model)

"""S3Gen's products on oneDNN-packed weights (s3gen_kernels.py): parity with the F.linear path,
that they really run, restore(), and the fallbacks (a failure at run time, a probe that
disagrees, a machine where oneDNN is slower)."""
import pytest
import torch

from chatterbox_accel import accelerate, restore
from chatterbox_accel import s3gen_kernels
from chatterbox_accel.s3gen_fast import compare_mels, mel_probe
from chatterbox_accel.t3.kernels import KernelTable

TOKENS = ((torch.arange(40) * 797 + 11) % 6561)[None]


@pytest.fixture
def counted(monkeypatch):
    """How many products the kernel table computed (not handed back to F.linear)."""
    calls = {"table": 0}
    original = KernelTable.__call__

    def counting(self, module, x):
        out = original(self, module, x)
        calls["table"] += out is not None
        return out

    monkeypatch.setattr(KernelTable, "__call__", counting)
    return calls


def probe(model):
    with torch.inference_mode():
        return mel_probe(model, model.conds.gen, TOKENS)[0]


def test_onednn_products_match_f_linear_and_restore_is_exact(tiny_model, counted):
    exact = probe(tiny_model)
    report = accelerate(tiny_model, s3gen_kernel="onednn", t3=False)
    assert "s3gen.kernel.onednn" in report.applied and "estimator probe" in report.s3gen_kernel
    fast = probe(tiny_model)
    assert counted["table"] > 100, "the flow's products must run on the packed copies"
    rel, cos = compare_mels(fast, exact)
    assert 0 < rel < 1e-5  # float32 rounding: not bit for bit, and nowhere near a fast mode's change
    restore(tiny_model)
    assert torch.equal(probe(tiny_model), exact)


def test_generate_runs_through_it(tiny_model, counted):
    torch.manual_seed(0)
    want = tiny_model.generate("Hello there.")
    accelerate(tiny_model, s3gen_kernel="onednn")
    try:
        torch.manual_seed(0)
        got = tiny_model.generate("Hello there.")
    finally:
        restore(tiny_model)
    assert counted["table"] > 100
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_a_run_time_failure_goes_back_to_f_linear_and_is_reported(tiny_model, monkeypatch):
    exact = probe(tiny_model)
    report = accelerate(tiny_model, s3gen_kernel="onednn", t3=False)
    registry_table = tiny_model.__dict__["_chatterbox_accel_registry"].state["s3gen_kernels"]
    for module, (param, version, _) in list(registry_table.entries.items()):
        registry_table.entries[module] = (param, version, "not a packed weight")  # the next product raises
    try:
        after = probe(tiny_model)
        assert registry_table.disabled is not None
        assert any("s3gen.kernel.onednn failed" in event for event in report.runtime)
        assert torch.equal(after, exact), "after the failure every product is F.linear's again"
    finally:
        restore(tiny_model)


def test_a_probe_that_disagrees_keeps_f_linear(tiny_model, monkeypatch, counted):
    monkeypatch.setattr(s3gen_kernels, "TOLERANCE", 0.0)  # any rounding difference now "disagrees"
    report = accelerate(tiny_model, s3gen_kernel="onednn", t3=False)
    try:
        assert "disagrees with F.linear" in report.fallbacks["s3gen.kernel"]
        assert "s3gen.kernel.onednn" not in report.applied
        before = counted["table"]
        probe(tiny_model)
        assert counted["table"] == before, "nothing of it may stay installed"
    finally:
        restore(tiny_model)


def test_auto_keeps_f_linear_where_onednn_measures_slower(tiny_model, monkeypatch):
    monkeypatch.setattr(s3gen_kernels, "time_products", lambda modules, table, **k: 1.0 if table else 0.5)
    report = accelerate(tiny_model, s3gen_kernel="auto", t3=False)
    try:
        assert "not faster here" in report.fallbacks["s3gen.kernel"]
        assert "F.linear 500.0 ms, oneDNN 1000.0 ms" in report.fallbacks["s3gen.kernel"]
    finally:
        restore(tiny_model)


def test_autocast_products_are_left_to_f_linear(tiny_model, counted):
    """s3gen_dtype="bfloat16" runs the estimator under autocast: its products must stay bf16."""
    accelerate(tiny_model, s3gen_kernel="onednn", s3gen_dtype="bfloat16", t3=False)
    try:
        probe(tiny_model)
        linear = s3gen_kernels.flow_linears(tiny_model)[0]
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            before = counted["table"]
            out = linear(torch.randn(64, linear.in_features))
        assert counted["table"] == before and out.dtype == torch.bfloat16
    finally:
        restore(tiny_model)


def test_option_is_validated():
    from chatterbox_accel.config import AccelConfig

    with pytest.raises(ValueError, match="s3gen_kernel='fast'"):
        AccelConfig(s3gen_kernel="fast")
    assert AccelConfig().s3gen_kernel == "plain"  # upstream's audio bit for bit unless asked

"""S3Gen's products on oneDNN-packed weights (s3gen_kernels.py): parity with the F.linear path,
that they really run, restore(), and the fallbacks (a failure at run time, a probe that
disagrees, a machine where oneDNN is slower); the default, s3gen_kernel="batch": the packed
products in generate_batch's flow only, generate() still upstream's audio bit for bit."""
import threading

import pytest
import torch

from chatterbox_accel import accelerate, restore
from chatterbox_accel.engine import generate_batch
from chatterbox_accel.patching import is_patched
from chatterbox_accel import s3gen_kernels
from chatterbox_accel.s3gen_fast import compare_mels, mel_probe

TOKENS = ((torch.arange(40) * 797 + 11) % 6561)[None]


@pytest.fixture
def counted(monkeypatch):
    """How many of S3Gen's products the packed copies computed (not handed back to F.linear;
    T3's products, which have kernel tables of their own, are not counted)."""
    calls = {"table": 0}
    original = s3gen_kernels.LinearThroughTable.__call__

    def counting(self, wrapped, instance, args, kwargs):
        handed_back = []

        def plain(*a, **k):
            handed_back.append(True)
            return wrapped(*a, **k)

        out = original(self, plain, instance, args, kwargs)
        calls["table"] += not handed_back
        return out

    monkeypatch.setattr(s3gen_kernels.LinearThroughTable, "__call__", counting)
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


def test_autocast_products_are_left_to_f_linear(tiny_model, counted, monkeypatch):
    """s3gen_dtype="bfloat16" runs the estimator under autocast: its products must stay bf16."""
    from chatterbox_accel import s3gen_fast

    monkeypatch.setattr(s3gen_fast, "PROBE_TOKENS", 8)  # bf16 autocast is emulated on CPUs without bf16
    accelerate(tiny_model, s3gen_kernel="onednn", s3gen_dtype="bfloat16", t3=False)
    try:
        with torch.inference_mode():
            mel_probe(tiny_model, tiny_model.conds.gen, TOKENS[:, :8])
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
    assert AccelConfig().s3gen_kernel == "batch"  # generate(): upstream's audio bit for bit unless asked


TEXTS = ["Hello there.", "A second, different sentence."]


@pytest.fixture
def packed_faster(monkeypatch):
    """Pin the batch gate's measurement: the packed products time faster than F.linear. Whether
    they do is the machine's business (an AMD EPYC measured 2x, an Intel Xeon with AMX slower);
    the tests that use this test what the choice does, not which way one CPU goes."""
    monkeypatch.setattr(s3gen_kernels, "time_products", lambda modules, table, **k: 0.5 if table else 1.0)


def test_default_batch_kernels_run_in_generate_batch_only(tiny_model, counted, packed_faster):
    torch.manual_seed(3)
    upstream = tiny_model.generate(TEXTS[0])
    plain = generate_batch(tiny_model, TEXTS, seed=[1, 2], max_new_tokens=10)  # not accelerated: F.linear
    assert counted["table"] == 0
    report = accelerate(tiny_model)
    try:
        assert "s3gen.kernel.batch" in report.applied and "first batched flow call" in report.s3gen_kernel
        linear = s3gen_kernels.flow_linears(tiny_model)[0]
        assert is_patched(linear.forward)
        torch.manual_seed(3)
        assert torch.equal(tiny_model.generate(TEXTS[0]), upstream) and counted["table"] == 0
        fast = tiny_model.generate_batch(TEXTS, seed=[1, 2], max_new_tokens=10)
        assert counted["table"] > 100, "generate_batch's flow must run on the packed copies"
        assert report.s3gen_kernel.startswith("generate_batch's flow: 1200-row products")
        assert "F.linear 1000.0 ms, oneDNN 500.0 ms" in report.s3gen_kernel  # the (pinned) measurement
        for a, b in zip(plain, fast):
            assert torch.equal(a.speech_tokens, b.speech_tokens)
            assert a.wav.shape == b.wav.shape
            deviation = ((a.wav - b.wav).abs().max() / a.wav.abs().max()).item()
            print(f"batch row on oneDNN vs F.linear: max|d|/max|wav| {deviation:.1e}")  # pytest -s shows it
            assert deviation <= 1e-4  # float32 rounding through 10 CFM steps and HiFT (measured 1.4e-6)
        before = counted["table"]
        torch.manual_seed(3)
        assert torch.equal(tiny_model.generate(TEXTS[0]), upstream), "generate() after a batch: F.linear again"
        assert counted["table"] == before
    finally:
        restore(tiny_model)
    assert not is_patched(linear.forward)


def test_the_gate_is_per_thread(tiny_model, counted, packed_faster):
    """Inside one thread's batch_products, a product in another thread (a concurrent generate())
    keeps F.linear."""
    accelerate(tiny_model, t3=False)
    try:
        linear = s3gen_kernels.flow_linears(tiny_model)[0]
        x = torch.randn(700, linear.in_features)
        seen = {}
        with torch.inference_mode(), s3gen_kernels.batch_products(tiny_model):
            here = counted["table"]
            linear(x)
            assert counted["table"] == here + 1
            worker = threading.Thread(target=lambda: seen.update(out=linear(x), calls=counted["table"]))
            worker.start()
            worker.join()
        assert seen["calls"] == here + 1
        assert torch.equal(seen["out"], torch.nn.functional.linear(x, linear.weight, linear.bias))
    finally:
        restore(tiny_model)


def test_batch_kernels_that_fail_to_prepare_leave_the_batch_on_f_linear(tiny_model, monkeypatch, counted):
    plain = generate_batch(tiny_model, TEXTS, seed=[1, 2], max_new_tokens=10)

    def refuse(*args, **kwargs):
        raise RuntimeError("injected: no oneDNN here")

    monkeypatch.setattr(s3gen_kernels, "KernelTable", refuse)
    report = accelerate(tiny_model, t3=False)
    try:
        fast = tiny_model.generate_batch(TEXTS, seed=[1, 2], max_new_tokens=10)
        assert "injected: no oneDNN here" in report.fallbacks["s3gen.kernel"] and not report.s3gen_kernel
        assert counted["table"] == 0
        for a, b in zip(plain, fast):
            assert torch.equal(a.wav, b.wav)
    finally:
        restore(tiny_model)


def test_the_batch_gate_keeps_f_linear_where_the_packed_products_measure_slower(tiny_model, monkeypatch, counted):
    """The rule, not one machine's outcome: where the batch's packed products time slower than
    F.linear, the batch keeps F.linear (its audio exactly the unaccelerated batch's) and the
    report says why, with the figures."""
    plain = generate_batch(tiny_model, TEXTS, seed=[1, 2], max_new_tokens=10)
    monkeypatch.setattr(s3gen_kernels, "time_products", lambda modules, table, **k: 1.0 if table else 0.5)
    report = accelerate(tiny_model, t3=False)
    try:
        fast = tiny_model.generate_batch(TEXTS, seed=[1, 2], max_new_tokens=10)
        assert "not faster here" in report.fallbacks["s3gen.kernel"] and not report.s3gen_kernel
        assert "F.linear 500.0 ms, oneDNN 1000.0 ms" in report.fallbacks["s3gen.kernel"]
        assert counted["table"] == 0
        for a, b in zip(plain, fast):
            assert torch.equal(a.wav, b.wav)
    finally:
        restore(tiny_model)

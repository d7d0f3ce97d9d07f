"""T3's CPU kernels chosen by measurement (t3/kernels.py): selection with injected timings,
parity of every product through the table, repacking, fallbacks, reduced-precision weights."""
import dataclasses

import pytest
import torch

import chatterbox_accel.t3.kernels as kernels
import chatterbox_accel.t3.model as fast_model
from chatterbox_accel import accelerate, restore
from chatterbox_accel.api import OutputCheckError, fast_inference_of, runner_of
from conftest import fresh, holder, probe


def original_tokens(t3, seed=0, **kwargs):
    torch.manual_seed(seed)
    t3_cond, text, _ = probe(t3)
    return type(t3).inference(t3, t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=20, **kwargs)


def fast_tokens(t3, seed=0, **kwargs):
    torch.manual_seed(seed)
    t3_cond, text, _ = probe(t3)
    return t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=20, **kwargs)


def forced_logits(model):
    """The fast runner's teacher-forced CFG logits on the standard probe."""
    runner = runner_of(model)
    t3_cond, text, forced = probe(model.t3, steps=8)
    embeds = runner.build_prompt(fresh(t3_cond), text, 0.5)
    return runner.teacher_forced_logits(embeds, forced, 0.5)


def timings(**ms):
    """A timer for select(): {kernel: (decode ms, prefill ms[, 16-row decode ms])}; a kernel given
    as an exception raises."""
    def timer(name, *args):
        value = ms[name.replace("-", "_")]
        if isinstance(value, Exception):
            raise value
        out = {"decode": value[0] / 1e3, "prefill": value[1] / 1e3}
        if len(value) > 2:
            out["batch"] = value[2] / 1e3
        return out
    return timer


def plain(module, x):
    return module(x)


# ---- selection, with injected timings (no model) ---------------------------------------------
@pytest.mark.parametrize("measured,decode,prefill", [
    (dict(plain=(10, 50), gemv=(14, float("inf")), onednn=(12, 40)), "plain", "plain"),  # slower never chosen
    (dict(plain=(10, 50), gemv=(8, float("inf")), onednn=(9, 40)), "gemv", "plain"),
    (dict(plain=(10, 50), gemv=(12, float("inf")), onednn=(7, 40)), "onednn", "onednn"),
    (dict(plain=(10, 50), gemv=(12, float("inf")), onednn=(9.8, 60)), "plain", "plain"),  # < 5 %: no copy
    (dict(plain=(10, 50), gemv=RuntimeError("no"), onednn=(7, 60)), "onednn", "plain"),
])
def test_the_fastest_measured_kernel_is_chosen_per_phase(measured, decode, prefill):
    sel = kernels.select([torch.nn.Linear(8, 8)], plain, "float32", timer=timings(**measured))
    assert (sel.decode, sel.prefill) == (decode, prefill)
    assert sel.timings["plain"]["decode"] == measured["plain"][0] / 1e3
    if isinstance(measured["gemv"], Exception):
        assert "gemv" not in sel.timings and "RuntimeError: no" in sel.skipped["gemv"]


def test_the_decode_kernel_serves_batches_too():
    """Guards the batch engine's speed: measured on an AVX-512 EPYC, `gemv` tied oneDNN at 2 rows
    and was 2.3x slower at 16 (8 requests), so choosing at 2 rows alone made batches slow. The
    choice weighs one pass at each size."""
    measured = dict(plain=(30.4, 25.6, 35.1), gemv=(9.0, float("inf"), 29.9), onednn=(9.1, 9.8, 13.2))
    sel = kernels.select([torch.nn.Linear(8, 8)], plain, "float32", timer=timings(**measured))
    assert (sel.decode, sel.prefill) == ("onednn", "onednn")
    two_rows_only = {k: v[:2] for k, v in measured.items()}
    assert kernels.select([torch.nn.Linear(8, 8)], plain, "float32", timer=timings(**two_rows_only)).decode == "gemv"
    assert "16-row decode" in sel.describe()


def test_a_reduced_precision_slower_than_plain_float32_is_refused():
    timer = timings(plain=(10, 50), fbgemm_int8=(11, 20), int8pack=RuntimeError("missing op"))
    with pytest.raises(kernels.KernelRefused, match=r"no int8 kernel measured faster.*int8pack failed \(RuntimeError"):
        kernels.select([torch.nn.Linear(8, 8)], plain, "int8", timer=timer)
    sel = kernels.select([torch.nn.Linear(8, 8)], plain, "int8",
                         timer=timings(plain=(10, 50), fbgemm_int8=(4, 20), int8pack=(3, 90)))
    assert (sel.decode, sel.prefill) == ("int8pack", "plain") and sel.speedup() == pytest.approx(10 / 3)


def test_a_reduced_precision_must_beat_the_exact_paths_best_kernel_not_just_plain():
    """Measured on a 2-core AVX2 EPYC (ms per sample pass, decode/prefill/16-row): bf16 15/166/113
    beat plain 32/28/67 but not oneDNN's float32 11/26/24, and precision="bfloat16" ran T3 at
    0.71x the exact path. A reduced format must beat what exact would run."""
    timer = timings(plain=(32, 28, 67), onednn=(11, 26, 24), bf16=(15, 166, 113))
    with pytest.raises(kernels.KernelRefused, match="exact path's best float32 kernel"):
        kernels.select([torch.nn.Linear(8, 8)], plain, "bfloat16", timer=timer)
    sel = kernels.select([torch.nn.Linear(8, 8)], plain, "bfloat16", timer=timings(
        plain=(32, 28, 67), onednn=(11, 26, 24), bf16=(6, 30, 20)))
    assert sel.decode == "bf16" and set(sel.timings) >= {"plain", "onednn", "bf16"}


def test_a_single_request_runs_plain_where_plain_is_faster_at_its_rows():
    """Measured on an Intel Xeon (ms per sample pass, 2 rows / 16 rows): onednn 16.9 / 23.3 won
    the decode cost over plain 14.2 / 39.6, so a lone request ran 19 % slower in its products.
    Now its own rows run plain, batches the copy (one copy either way)."""
    sel = kernels.select([torch.nn.Linear(8, 8)], plain, "float32",
                         timer=timings(plain=(14.2, 30, 39.6), onednn=(16.9, 30, 23.3)))
    assert (sel.decode, sel.single) == ("onednn", "plain") and "one request's decode plain" in sel.describe()
    modules = [torch.nn.Linear(64, 32) for _ in range(2)]
    table = kernels.KernelTable(modules, sel.decode, sel.prefill, rows=2, single=sel.single)
    with torch.inference_mode():
        assert table(modules[0], torch.randn(2, 64)) is None  # plain answers a single request
        assert table(modules[0], torch.randn(16, 64)) is not None  # the copy answers a batch
    s3gen_like = kernels.KernelTable(modules, "plain", "onednn", rows=600)  # no single: rows is a size hint
    with torch.inference_mode():
        assert s3gen_like(modules[0], torch.randn(600, 64)) is not None


def test_a_pinned_kernel_is_not_measured():
    def timer(*args):
        raise AssertionError("measured")

    sel = kernels.select([torch.nn.Linear(8, 8)], plain, "float32", pinned="gemv", timer=timer)
    assert (sel.decode, sel.prefill, sel.pinned) == ("gemv", "plain", True)
    with pytest.raises(ValueError, match="not a float32 kernel"):
        kernels.select([torch.nn.Linear(8, 8)], plain, "float32", pinned="int4pack")


def test_the_real_measurement_is_brief_and_reported(tiny_t3):
    model = holder(tiny_t3)
    report = accelerate(model)
    sel = report.kernels
    assert set(sel.timings) == {"plain", "gemv", "onednn"} and sel.seconds > 0
    # The rule (not which kernel wins: that is the machine's): the chosen decode kernel has the
    # least measured cost of every candidate timed, plain included; the prefill the faster of
    # plain and that kernel.
    costs = {name: kernels.decode_cost(name, t, "float32") for name, t in sel.timings.items()}
    assert costs[sel.decode] == min(costs.values()) and costs[sel.decode] <= costs["plain"]
    assert sel.prefill in ("plain", sel.decode)
    other = sel.decode if sel.prefill == "plain" else "plain"
    assert sel.timings[sel.prefill]["prefill"] <= sel.timings[other]["prefill"]
    assert "t3.cpu_kernels" in report.applied and "kernels   float32: decode" in str(report)


def test_every_kernel_matches_f_linear_of_the_weight_it_stands_for():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for kernel in kernels.KERNELS.values():
        if kernel.prepare is not None and kernel.supports(w):
            try:
                copy, stands_for = kernel.prepare(w, 2)
            except RuntimeError as exc:
                if "needs the cpu support" in str(exc):  # onednn-bf16 on an AVX2-only CPU
                    continue
                raise
            kernels.check_product(kernel, copy, stands_for)  # raises when off


# ---- the table under accelerate() ----------------------------------------------------------------
def test_every_product_runs_on_the_pinned_kernel_and_gives_the_original_tokens(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    report = accelerate(model, cpu_kernel="onednn")
    assert report.kernels.pinned and report.check.passed, str(report)
    table = runner_of(model).backbone.kernels
    assert len(table.entries) == 7 * len(tiny_t3.tfmr.layers) + 1  # 7 projections per layer + speech head

    def unplain(*args):
        raise AssertionError("a T3 product ran on the plain kernel")

    monkeypatch.setattr(fast_model, "linear", unplain)
    assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()


def test_a_weight_changed_after_packing_is_repacked(tiny_t3):
    model = holder(tiny_t3)
    accelerate(model, cpu_kernel="onednn")
    before = forced_logits(model)
    weight = tiny_t3.tfmr.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(3.0)  # in place: the packed copy is now stale
    try:
        after = forced_logits(model)
        runner_of(model).backbone.kernels = None  # the plain kernels on the changed weights
        plain_logits = forced_logits(model)
    finally:
        with torch.no_grad():
            weight.div_(3.0)
    assert (after - before).abs().max() > 1e-2  # the change reached the packed path ...
    assert torch.allclose(after, plain_logits, rtol=0, atol=1e-4 * plain_logits.abs().max())  # ... exactly as plain


def test_a_failing_candidate_is_skipped_and_a_failing_pin_falls_back(tiny_t3, monkeypatch):
    def broken(weight, rows):
        raise RuntimeError("injected: no oneDNN kernel")

    monkeypatch.setattr(kernels, "_onednn_pack", broken)
    model = holder(tiny_t3)
    report = accelerate(model)
    assert "injected: no oneDNN kernel" in report.kernels.skipped["onednn"] and report.check.passed
    report = accelerate(model, cpu_kernel="onednn")
    assert "injected: no oneDNN kernel" in report.fallbacks["t3.cpu_kernels"] and report.check.passed
    assert runner_of(model).backbone.kernels is None
    assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()


def test_run_time_failure_switches_the_table_off_and_decoding_goes_on(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    accelerate(model, cpu_kernel="onednn")
    calls = []

    def broken(run):
        def fail(x, copy):
            calls.append(1)
            raise RuntimeError("injected: oneDNN failed")
        return fail

    monkeypatch.setattr(kernels, "_flat", broken)
    assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()
    assert "injected: oneDNN failed" in runner_of(model).backbone.kernels.disabled
    assert len(calls) == 1  # switched off at the first failure, not retried per product
    assert fast_inference_of(model).calls == {"fast": 1, "original": 0}  # the fast loop carried on


def test_a_kernel_that_disagrees_is_refused_when_prepared(tiny_t3, monkeypatch):
    right = kernels.KERNELS["onednn"]
    wrong = dataclasses.replace(right, run=lambda x, packed: right.run(x, packed) * 1.001)
    monkeypatch.setitem(kernels.KERNELS, "onednn", wrong)
    report = accelerate(holder(tiny_t3), cpu_kernel="onednn")
    assert "onednn kernel disagrees with F.linear" in report.fallbacks["t3.cpu_kernels"]


@pytest.mark.parametrize("options,why", [({"cpu_prepack": False}, None),
                                         ({"compile": True, "check": False}, "compiled")])
def test_no_packing_when_asked_or_when_the_step_is_compiled(tiny_t3, monkeypatch, options, why):
    import chatterbox_accel.api as api

    def compiled(runner, **kwargs):  # stands in for torch.compile (slow to run here): a new step
        runner.step = lambda *a, **kw: runner.slot_logits(*a, **kw)
        return {"applied": ["t3.compile"], "fallbacks": {}}

    monkeypatch.setattr(api, "install_step", compiled)
    monkeypatch.setattr(kernels, "time_kernel", lambda name, *a: {"decode": 0.001 if name == "onednn" else 0.01,
                                                                  "prefill": 0.01})
    report = accelerate(holder(tiny_t3), **options)
    if why:
        assert why in report.fallbacks["t3.cpu_kernels"] and report.kernels is None
    else:  # onednn measured 10x faster, but not allowed
        assert "onednn" not in report.kernels.timings and report.kernels.decode != "onednn"


# ---- reduced-precision weights -------------------------------------------------------------------
def test_restore_after_a_quantized_accelerate_leaves_weights_and_outputs_identical(tiny_t3):
    before = {k: v.clone() for k, v in tiny_t3.state_dict().items()}
    expected = original_tokens(tiny_t3)
    model = holder(tiny_t3)
    report = accelerate(model, precision="int8", cpu_kernel="int8pack")
    assert "t3.precision.int8" in report.applied and report.check.precision == "int8", str(report)
    fast_tokens(tiny_t3)
    restore(model)
    after = tiny_t3.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert "inference" not in tiny_t3.__dict__
    assert original_tokens(tiny_t3).tolist() == expected.tolist()


def test_a_slower_precision_is_refused_and_float32_selected(tiny_t3, monkeypatch):
    monkeypatch.setattr(kernels, "time_kernel", lambda name, *a: {"decode": 0.001 if name == "plain" else 0.01,
                                                                  "prefill": 0.01})
    report = accelerate(holder(tiny_t3), precision="int4")
    assert "no int4 kernel measured faster" in report.fallbacks["t3.precision"]
    assert report.kernels.precision == "float32" and report.check.precision == "float32" and report.check.passed


def test_a_precision_over_its_limits_is_refused_with_the_figures(tiny_t3, monkeypatch):
    """Old: a reduced precision that failed the check reverted every patch, the exact fast path
    included. Now it falls back to the exact fast path, and the report says why, with figures."""
    import chatterbox_accel.check as check

    monkeypatch.setitem(check.PRECISION_LIMITS, "int8", check.PrecisionLimits(argmax=1.0, tv_mean=0.0, tv_max=0.0))
    model = holder(tiny_t3)
    report = accelerate(model, precision="int8", cpu_kernel="fbgemm-int8")
    try:
        assert report.ok and report.check.passed and report.check.precision == "float32", str(report)
        assert "t3.precision.int8" not in report.applied and "t3.device_sampler" in report.applied
        assert report.kernels.precision == "float32"
        why = report.fallbacks["t3.precision"]
        assert "fbgemm-int8 refused by the output check" in why and "sampling TV mean" in why
        assert "exact fast path" in why and [name for name, _ in report.refused] == ["fbgemm-int8"]
        assert "inference" in tiny_t3.__dict__  # the fast loop runs
        assert fast_tokens(tiny_t3).tolist() == original_tokens(tiny_t3).tolist()
    finally:
        restore(model)
    with pytest.raises(OutputCheckError, match=r"output check FAILED.*int8: limits"):
        accelerate(model, precision="int8", cpu_kernel="fbgemm-int8", strict=True)
    assert "inference" not in tiny_t3.__dict__


def test_a_refused_kernel_falls_back_to_the_next_of_its_precision(tiny_t3, monkeypatch):
    """The gate refuses the fastest int8 kernel: the next int8 kernel that measured faster than
    exact is tried and runs; applied names int8, the report names the refused kernel."""
    import chatterbox_accel.check as check

    monkeypatch.setattr(kernels, "time_kernel", lambda name, *a: {
        "plain": {"decode": 0.01, "batch": 0.02, "prefill": 0.01}, "fbgemm-int8": {"decode": 0.002, "batch": 0.004,
        "prefill": 0.02}, "int8pack": {"decode": 0.004, "batch": 0.008, "prefill": 0.02}}[name])
    real = check.compare

    def refuse_fbgemm(fast, ref, tolerance, precision="float32", *args):
        result = real(fast, ref, tolerance, precision, *args)
        table = runner_of_holder["runner"].backbone.kernels
        if table is not None and table.decode.name == "fbgemm-int8":
            result = dataclasses.replace(result, passed=False)
        return result

    runner_of_holder = {}
    monkeypatch.setattr(check, "compare", refuse_fbgemm)
    model = holder(tiny_t3)
    from chatterbox_accel.t3 import decode as decode_module

    real_use = decode_module.CachedRunner.use_kernels

    def use(self, *a, **k):
        runner_of_holder["runner"] = self
        return real_use(self, *a, **k)

    monkeypatch.setattr(decode_module.CachedRunner, "use_kernels", use)
    report = accelerate(model, precision="int8")
    try:
        assert report.check.passed and report.check.precision == "int8", str(report)
        assert "t3.precision.int8" in report.applied and report.kernels.decode == "int8pack"
        assert "fbgemm-int8 refused by the output check" in report.fallbacks["t3.precision"]
        assert "int8pack runs" in report.fallbacks["t3.precision"]
        assert runner_of(model).backbone.kernels.decode.name == "int8pack"  # what runs is what it says
    finally:
        restore(model)


def test_cpu_prepack_false_keeps_int8_candidates(tiny_t3, monkeypatch):
    monkeypatch.setattr(kernels, "time_kernel", lambda name, *a: {
        "decode": {"plain": 0.01, "gemv": 0.005, "onednn": 0.005}.get(name, 0.001), "prefill": 0.01})
    report = accelerate(holder(tiny_t3), precision="int8", cpu_prepack=False)
    assert report.kernels.precision == "int8" and "t3.precision" not in report.fallbacks, str(report)


def test_cpu_kernel_must_match_the_precision():
    with pytest.raises(ValueError, match=r"cpu_kernel='onednn' is not valid with precision='int8'"):
        accelerate(holder(None), precision="int8", cpu_kernel="onednn")
    with pytest.raises(ValueError, match="precision='int3' is not valid"):
        accelerate(holder(None), precision="int3")


# Every bf16/int8 kernel on the full-size (flat) checkpoint passes the gate, whose limits are the
# same on every CPU (check.py says why each value); int4 passes or is refused with its figures
# while exact runs (on a 2-core AVX2 EPYC it was refused); the realistic checkpoint's figures are in
# test_precision_gate.py and bench_quality. (These once asserted KL bounds measured on one Xeon,
# which fbgemm's AVX2 path exceeded: a threshold from one CPU, not a rule.)
@pytest.mark.parametrize("precision,kernel", [
    ("bfloat16", "onednn-bf16"), ("bfloat16", "bf16"), ("int8", "fbgemm-int8"), ("int8", "int8pack"),
    ("int4", "int4pack"),
])
def test_full_size_reduced_precision_passes_the_gate(full_size_t3, precision, kernel):
    model = holder(full_size_t3)
    report = accelerate(model, precision=precision, cpu_kernel=kernel)
    try:
        why = report.fallbacks.get("t3.cpu_kernels", "")
        if "needs the cpu support" in why:  # e.g. onednn-bf16 on an AVX2-only CPU: fell back, as it must
            pytest.skip(f"{kernel} is not supported by this CPU ({why})")
        check = report.check
        if precision == "int4" and report.refused:  # int4 may fail the gate: then exact runs, figures given
            assert check.passed and check.precision == "float32", str(report)
            assert "int4pack refused by the output check" in report.fallbacks["t3.precision"]
            return
        assert check.passed and check.precision == precision, str(report)
        assert check.rel_diff > 1e-4  # the copies really are reduced: not the float32 weights
    finally:
        restore(model)


@pytest.fixture(scope="module")
def full_size_t3():
    from chatterbox_accel.checkpoints import full_t3

    return full_t3(seed=0)

"""The GPU step's defects, each caught on a CPU (issue 11, point 6). Every test names the old
behaviour it fails on."""
import functools
import types

import pytest
import torch

from chatterbox_accel import accelerate
from chatterbox_accel.api import report_of, runner_of
from chatterbox_accel.check import probe_inputs, run_output_check
from chatterbox_accel.checkpoints import tiny_t3
from chatterbox_accel.t3.decode import T3Runner
from chatterbox_accel.t3.graphs import CudaGraphStep, GuardedStep, install_step
from chatterbox_accel.t3.model import rope_table, sdpa_attention

from conftest import fresh, holder


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() re-runs the captured call."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


def fake_capture(inner):
    def capture(state, cache, kv_len):
        out = inner(state, cache, kv_len).clone()  # capturing warms up: the shape of the output

        def run():
            out.copy_(inner(state, cache, kv_len))

        return FakeGraph(run), out

    return capture


def request(runner, t3, max_new):
    t3_cond, text, _ = probe_inputs(t3, None, 1)
    options = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
    with torch.inference_mode():
        return runner.request(t3_cond, text, options, max_new)


def test_graphs_are_invalidated_when_the_runner_reallocates_its_cache(tiny_t3):
    """Old: graphs keyed by id() of the cache; a reallocated cache can take the freed one's id
    and a graph would replay into freed buffers. Now the step holds the objects it captured on,
    and the runner invalidates it when it allocates a new cache."""
    runner = T3Runner(tiny_t3, attention=sdpa_attention)
    step = CudaGraphStep(runner.slot_logits, capture=fake_capture(runner.slot_logits))
    runner.step = GuardedStep(runner, step, "fake graphs")
    torch.manual_seed(0)
    eager = runner.generate(request(runner, tiny_t3, 6))
    runner.step = GuardedStep(runner, step, "fake graphs")
    torch.manual_seed(0)
    assert torch.equal(runner.generate(request(runner, tiny_t3, 6)), eager)  # replays do the step
    first_view = runner.slot_cache(1, 1)
    assert step.captures >= 1 and step.owners[1][1] is first_view  # held, so its id cannot be reused
    captures = step.captures
    runner.generate(request(runner, tiny_t3, 6))
    assert step.captures == captures  # same buffers: replayed, not recaptured
    runner.generate(request(runner, tiny_t3, 400))  # needs a longer cache: reallocated, graphs dropped
    assert runner.slot_cache(1, 1) is not first_view
    assert step.owners[1][1] is runner.slot_cache(1, 1) and step.captures > captures
    # Explicit invalidation empties the graphs whatever the ids.
    step.invalidate()
    assert step.graphs == {} and step.owners == {}


def test_graph_step_recaptures_for_other_buffers_even_with_a_recycled_id():
    """The ownership test is identity of held objects, never id() equality."""
    calls = []
    step = CudaGraphStep(lambda *a: torch.zeros(1), capture=lambda s, c, k: (types.SimpleNamespace(
        replay=lambda: calls.append(c)), torch.zeros(1)))
    state = types.SimpleNamespace(token=torch.zeros(1), slots=1)
    a, b = object(), object()
    step(state, a, 64)
    step(state, a, 64)
    step(state, b, 64)
    assert step.captures == 2 and step.owners[1][1] is b and calls == [a, a, b]


def test_graphs_are_kept_per_slot_count_and_captured_largest_first_at_warm_up():
    """Batch buckets: a one-slot and an eight-slot decoder keep their own graphs (alternating
    generate() and generate_batch() replays both, no recapture); capture_all takes a decoder's
    kv buckets largest first over padding rows, and leaves its state as found."""
    from chatterbox_accel.t3.batch import SlotState

    seen = []

    def capture(s, c, k):
        seen.append((s.slots, k, s.pos.tolist()))
        return types.SimpleNamespace(replay=lambda: None), torch.zeros(1)

    step = CudaGraphStep(None, capture=capture)
    one, eight = SlotState.empty(1, "cpu"), SlotState.empty(8, "cpu")
    cache = types.SimpleNamespace(ensure=lambda upto: seen.append(("ensure", upto, None)))
    eight.pos.fill_(7)
    step.capture_all(eight, cache, [64, 192, 128])
    assert seen[0] == ("ensure", 192, None)  # a lazy cache is zeroed as far as the graphs read first
    assert [k for _, k, _ in seen[1:]] == [192, 128, 64] and all(p == [0] * 8 for _, _, p in seen[1:])
    assert eight.pos.tolist() == [7] * 8
    step(one, cache, 64)
    step(eight, cache, 64)
    step(one, cache, 64)
    assert step.captures == 4 and set(step.owners) == {1, 8}


def test_output_check_runs_through_the_installed_step(tiny_t3):
    """Old: the check teacher-forced the eager function, so a broken compiled/captured step
    passed it. A step that returns wrong logits must now fail the check."""
    runner = T3Runner(tiny_t3, attention=sdpa_attention)

    def broken(state, cache, kv_len):
        return runner.slot_logits(state, cache, kv_len) * 1.5  # what a miscompiled step might give

    ok = run_output_check(tiny_t3, runner, None, steps=6, tolerance=1e-3)
    runner.step = broken
    bad = run_output_check(tiny_t3, runner, None, steps=6, tolerance=1e-3)
    assert ok.passed and not bad.passed


def test_output_check_runs_through_the_prefill_decoding_uses(tiny_t3):
    """The check's prompt goes through the same shared prefill as real requests (the voice's
    prefix and unconditional text table): a corrupted table must fail it. (Before, the check's
    request carried no prefix, so it prefilled whole and never read the table.)"""
    runner = T3Runner(tiny_t3, attention=sdpa_attention)
    assert run_output_check(tiny_t3, runner, None, steps=6, tolerance=1e-3).passed
    (_, voice), = runner.prefixes.entries  # the table the check just built and read
    with torch.inference_mode():
        voice.rows.k.mul_(1.5)  # what a stale or miscomputed table would hold
    assert not run_output_check(tiny_t3, runner, None, steps=6, tolerance=1e-3).passed


def test_bf16_rope_table_is_computed_from_fp32_frequencies():
    """Old: the bf16 private copy cast rotary_emb.inv_freq to bf16, so every table built from it
    was off by ~1 rad of phase by position ~500. Now its table equals the fp32 one cast to bf16."""
    t3 = tiny_t3(seed=0, layers=2)
    runner = T3Runner(t3, attention=sdpa_attention, dtype=torch.bfloat16)
    assert runner.tfmr.rotary_emb.inv_freq.dtype == torch.bfloat16  # the copy's buffer was cast
    runner.llama.new_cache(1, 1024)
    cos32, sin32 = rope_table(t3.tfmr, 1024, "cpu", torch.float32)
    assert torch.equal(runner.llama.cos[:1024], cos32.to(torch.bfloat16))
    assert torch.equal(runner.llama.sin[:1024], sin32.to(torch.bfloat16))
    # What the old table was: from the cast frequencies.
    positions = torch.arange(1024)[None]
    old_cos, _ = runner.tfmr.rotary_emb(torch.empty(1), positions)
    assert (old_cos[0] - cos32).abs()[500:].max() > 0.1


def test_bf16_loaded_t3_runs_in_bf16_without_a_float32_copy():
    """Old: a T3 loaded in bf16 got a float32 private copy (2 GB at full size) and the float32
    check tolerance. Now it computes in its own dtype, on its own weights, checked at the
    reduced-precision tolerance."""
    t3 = tiny_t3(seed=0, layers=2).to(torch.bfloat16)
    model = holder(t3)
    report = accelerate(model)
    runner = runner_of(model)
    assert runner.tfmr is t3.tfmr and runner.llama.dtype == torch.bfloat16
    assert report.check.passed and report.check.tolerance == 5e-2, str(report)
    t3_cond, text, _ = probe_inputs(t3, None, 1)
    tokens = t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=5)
    assert tokens.shape[-1] >= 1 and runner_of(model) is runner


def test_reduce_overhead_off_cuda_is_a_fallback_not_applied(tiny_t3):
    """Old: compile_mode='reduce-overhead' on a CPU was reported as applied, though its CUDA
    graphs cannot exist there."""
    runner = T3Runner(tiny_t3, attention=sdpa_attention)
    result = install_step(runner, compile_step=True, mode="reduce-overhead", cuda_graphs=False, warmup=lambda: None)
    assert result["applied"] == ["t3.compile[default]"]
    assert "need CUDA" in result["fallbacks"]["t3.compile[reduce-overhead]"]


def test_warmup_allocates_the_cache_real_calls_use(tiny_t3, monkeypatch):
    """Old: the warm-up compiled on a 256-slot cache, and the first real generate() (1000 new
    tokens) regrew it and recompiled. Now the cache after warm-up already fits a real call."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=False))
    model = holder(tiny_t3)
    accelerate(model, compile=True, check=False)
    runner = runner_of(model)
    warmed = runner.slot_cache(1, 1)
    prompt = request(runner, tiny_t3, 1000).prompt_len
    assert runner.slot_cache(1, prompt + 40 + 1000) is warmed  # a prompt 40 longer, 1000 new


def oom():
    error = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return error("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_transient_failure_does_not_switch_the_fast_path_off_for_good(tiny_t3, monkeypatch):
    """Old: one CUDA OOM disabled the fast path for the model's life. Now that call is answered
    by the original, the next one is fast again, and the model's report lists the event."""
    model = holder(tiny_t3)
    accelerate(model, check=False)
    fast = tiny_t3.__dict__["inference"]._self_wrapper
    runner = fast.runner
    real = runner.token_blocks
    failures = iter([oom()])

    def flaky(*args, **kwargs):
        for exc in failures:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "token_blocks", flaky)
    t3_cond, text, _ = probe_inputs(tiny_t3, None, 1)
    tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=4)
    assert fast.calls == {"fast": 0, "original": 1} and fast.disabled is None
    tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=4)
    assert fast.calls == {"fast": 1, "original": 1}
    report = report_of(model)
    assert any("out of memory" in e for e in report.runtime) and "run time" in str(report)


def test_persistent_failure_switches_off_and_is_reported(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    fast = tiny_t3.__dict__["inference"]._self_wrapper
    monkeypatch.setattr(fast.runner, "token_blocks", functools.partial(_raise, RuntimeError("kernel exploded")))
    t3_cond, text, _ = probe_inputs(tiny_t3, None, 1)
    tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=4)
    assert fast.disabled and "kernel exploded" in fast.disabled
    assert any("switched off" in e for e in report_of(model).runtime)


def test_repeated_transient_failures_switch_off(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    fast = tiny_t3.__dict__["inference"]._self_wrapper
    monkeypatch.setattr(fast.runner, "token_blocks", lambda *a, **k: _raise(oom()))
    t3_cond, text, _ = probe_inputs(tiny_t3, None, 1)
    for _ in range(fast.max_transient):
        tiny_t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=4)
    assert fast.disabled is not None and fast.calls["original"] == fast.max_transient


def _raise(exc, *args, **kwargs):
    raise exc

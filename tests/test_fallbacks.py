"""Every optimization falls back when it fails: injected failures at warm-up and at run time."""
import torch

import chatterbox_accel.t3.graphs as graphs
from chatterbox_accel import accelerate, restore
from chatterbox_accel.api import runner_of
from chatterbox_accel.t3.graphs import GuardedStep, install_step
from conftest import fresh, holder, probe


def run(t3, seed=5, tokens=12):
    t3_cond, text, _ = probe(t3)
    torch.manual_seed(seed)
    return t3.inference(t3_cond=fresh(t3_cond), text_tokens=text, max_new_tokens=tokens)


def eager_tokens(t3):
    model = holder(t3)
    accelerate(model, check=False)
    out = run(t3)
    restore(model)
    return out


def test_failing_compile_falls_back_to_eager(tiny_t3, monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("injected: inductor exploded")
        return compiled

    monkeypatch.setattr(graphs.torch, "compile", broken_compile)
    expected = eager_tokens(tiny_t3)
    model = holder(tiny_t3)
    report = accelerate(model, compile=True)
    assert "injected: inductor exploded" in report.fallbacks["t3.compile[default]"]
    assert not any("compile" in name for name in report.applied)
    assert report.check.passed
    assert runner_of(model).step == runner_of(model).slot_logits
    assert torch.equal(run(tiny_t3), expected)


def test_cuda_graph_capture_failure_falls_back(tiny_t3):
    """On a CPU, capture itself fails (no CUDA): a real failure of the capture path."""
    from chatterbox_accel.t3.decode import T3Runner
    from chatterbox_accel.t3.model import sdpa_attention

    runner = T3Runner(tiny_t3, attention=sdpa_attention)

    def warmup():
        t3_cond, text, _ = probe(tiny_t3)
        options = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
        runner.generate(runner.request(fresh(t3_cond), text, options, 4))

    result = install_step(runner, compile_step=False, mode="default", cuda_graphs=True, warmup=warmup)
    assert result["applied"] == [] and "t3.cuda_graphs" in result["fallbacks"]
    assert runner.step == runner.slot_logits
    warmup()  # and the eager step works


def test_cuda_graphs_requested_on_cpu_are_reported(tiny_t3):
    report = accelerate(holder(tiny_t3), cuda_graphs=True, check=False)
    assert "need a CUDA device" in report.fallbacks["t3.cuda_graphs"]


def test_guarded_step_switches_to_eager_at_run_time(tiny_t3):
    expected = eager_tokens(tiny_t3)
    model = holder(tiny_t3)
    accelerate(model, check=False)
    runner = runner_of(model)
    calls = []

    def flaky(state, cache, kv_len):
        calls.append(kv_len)
        raise RuntimeError("injected: graph replay failed")

    guard = GuardedStep(runner, flaky, "t3.test")
    runner.step = guard
    assert torch.equal(run(tiny_t3), expected)
    assert len(calls) == 1 and "graph replay failed" in guard.error
    assert runner.step == runner.slot_logits


def test_fast_path_failure_at_run_time_uses_the_original(tiny_t3, monkeypatch):
    model = holder(tiny_t3)
    accelerate(model, check=False)
    runner = runner_of(model)

    def broken(*args, **kwargs):
        raise RuntimeError("injected: kernel failure")  # not transient (OOM is: see test_step_fixes.py)

    monkeypatch.setattr(runner, "token_blocks", broken)
    fast = tiny_t3.__dict__["inference"]._self_wrapper
    out = run(tiny_t3)
    assert out.shape[0] == 1 and out.shape[1] >= 1
    assert "injected: kernel failure" in fast.disabled
    run(tiny_t3)
    assert fast.calls == {"fast": 0, "original": 2}

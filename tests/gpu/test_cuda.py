"""The CUDA tier: what only a GPU can show. Skipped cleanly without CUDA (every CPU run);
`scripts/gpu_check.sh --first` runs it on a lent GPU, each test under a timeout. Not yet run on
a GPU by this project: tests/test_gpu_first_run.py has the CPU-visible halves of these."""
import dataclasses
import types

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(layers=2):
    from chatterbox_accel.checkpoints import tiny_t3

    return tiny_t3(seed=0, layers=layers).cuda()


def probe(t3, steps, cfg_weight=0.5):
    from chatterbox_accel.check import probe_inputs

    t3_cond, text, forced = probe_inputs(t3, None, steps, cfg_weight)
    return dataclasses.replace(t3_cond, cond_prompt_speech_emb=None), text, forced


STEPS = [(dict(), "t3.compile+cuda_graphs"), (dict(compile=False), "t3.cuda_graphs"),
         (dict(compile=False, cuda_graphs=False), None)]


@pytest.mark.parametrize("options,step", STEPS, ids=["default", "graphs-only", "eager"])
def test_installed_step_passes_the_check_and_gives_the_original_greedy_tokens(options, step):
    from chatterbox_accel import accelerate, restore
    from chatterbox_accel.api import runner_of

    t3 = tiny()
    model = types.SimpleNamespace(t3=t3, conds=None)
    report = accelerate(model, **options)
    try:
        assert report.check.passed, str(report)
        steps = [a for a in report.applied if a.startswith(("t3.compile", "t3.cuda_graphs"))]
        assert steps == ([step] if step else []), str(report)  # what was asked for runs: no silent fallback
        runner = runner_of(model)
        captures = runner.step.captures if step else 0
        assert not step or "graphs" not in step or captures > 0, "warm-up captures the graphs"
        t3_cond, text, _ = probe(t3, 1)
        kwargs = dict(text_tokens=text, max_new_tokens=40, temperature=1e-6)
        torch.manual_seed(0)
        want = type(t3).inference(t3, t3_cond=t3_cond, **kwargs)
        torch.manual_seed(0)
        got = t3.inference(t3_cond=dataclasses.replace(t3_cond), **kwargs)
        assert got.tolist() == want.tolist()
        warmed = runner.cache.max_len
        if step and "graphs" in step:
            assert runner.step.captures == captures, "a call within the warm-up cache captures nothing new"
        # Past the warm-up cache (prompt + 1000 + 256): the cache is reallocated at admission and
        # the graphs recaptured on it, whether or not the decode then stops early.
        got2 = t3.inference(t3_cond=dataclasses.replace(t3_cond), **{**kwargs, "max_new_tokens": 1500})
        assert runner.cache.max_len > warmed
        assert got2[0, : got.shape[1]].tolist() == got[0].tolist()
        if step and "graphs" in step:
            assert runner.step.captures > captures
        assert report.runtime == [], report.runtime  # no run-time fallback to eager
    finally:
        restore(model)


def test_graphs_only_step_passes_the_output_check_in_bf16():
    from chatterbox_accel import accelerate, restore

    model = types.SimpleNamespace(t3=tiny(), conds=None)
    report = accelerate(model, compile=False, dtype="bfloat16")
    try:
        assert report.check.passed and report.check.precision == "bfloat16", str(report)
        assert "t3.cuda_graphs" in report.applied
    finally:
        restore(model)


def test_steady_state_steps_do_not_sync():
    """15 decode steps between host reads (eos_check_every=16) launch work and never wait."""
    from chatterbox_accel.t3.decode import T3Runner
    from chatterbox_accel.t3.model import sdpa_attention

    t3 = tiny()
    runner = T3Runner(t3, attention=sdpa_attention, sync_every=16)
    t3_cond, text, _ = probe(t3, 1)
    options = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
    decoder = runner.decoder(2)
    with torch.inference_mode():
        for _ in range(2):
            decoder.submit(runner.request(t3_cond, text, options, 64))
        decoder.step()  # admission and prefill (a host read of the first tokens)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(15):
                assert decoder.step() == []
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_mel_probe_leaves_the_cuda_rng_as_it_was():
    from chatterbox_accel.s3gen_fast import mel_probe

    s3gen = types.SimpleNamespace(device=torch.device("cuda"),
                                  flow_inference=lambda tokens, **k: torch.randn(1, 80, 8, device="cuda"))
    torch.cuda.manual_seed(123)
    before = torch.cuda.get_rng_state()
    mel_probe(types.SimpleNamespace(s3gen=s3gen), {})
    assert torch.equal(torch.cuda.get_rng_state(), before)


def test_bf16_logits_stay_close_past_position_1000():
    """RoPE tables built from fp32 frequencies: no phase drift at long positions."""
    from chatterbox_accel.check import kl_per_step, reference_logits
    from chatterbox_accel.t3.decode import T3Runner
    from chatterbox_accel.t3.model import sdpa_attention

    t3 = tiny()
    t3_cond, text, forced = probe(t3, 1100)
    runner = T3Runner(t3, attention=sdpa_attention, dtype=torch.bfloat16)
    embeds = runner.build_prompt(t3_cond, text, 0.5)
    fast = runner.teacher_forced_logits(embeds, forced, 0.5).float()
    ref = reference_logits(t3, embeds, forced, 0.5).float()
    kl = kl_per_step(ref, fast)
    assert kl[1000:].mean() < 1e-2 and kl[1000:].mean() < 10 * kl[:100].mean() + 1e-4, (kl[:100].mean(), kl[1000:].mean())


def test_memory_does_not_grow_across_calls():
    from chatterbox_accel import accelerate, restore

    t3 = tiny()
    model = types.SimpleNamespace(t3=t3, conds=None)
    accelerate(model)
    try:
        t3_cond, text, _ = probe(t3, 1)
        run = lambda: t3.inference(t3_cond=dataclasses.replace(t3_cond), text_tokens=text, max_new_tokens=64)  # noqa: E731
        run()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= before + (1 << 20)
    finally:
        restore(model)

"""The CUDA tier: what only a GPU can show. Skipped cleanly without CUDA (every CPU run);
`scripts/gpu_check.sh` runs it on a lent GPU. Not yet run on a GPU by this project."""
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


@pytest.mark.parametrize("options", [dict(), dict(compile=False, cuda_graphs=False), dict(compile=False)])
def test_installed_step_passes_the_check_and_gives_the_original_greedy_tokens(options):
    from chatterbox_accel import accelerate, restore

    t3 = tiny()
    model = types.SimpleNamespace(t3=t3, conds=None)
    report = accelerate(model, **options)
    try:
        assert report.check.passed, str(report)
        t3_cond, text, _ = probe(t3, 1)
        kwargs = dict(text_tokens=text, max_new_tokens=40, temperature=1e-6)
        torch.manual_seed(0)
        want = type(t3).inference(t3, t3_cond=t3_cond, **kwargs)
        torch.manual_seed(0)
        got = t3.inference(t3_cond=dataclasses.replace(t3_cond), **kwargs)
        got2 = t3.inference(t3_cond=dataclasses.replace(t3_cond), **{**kwargs, "max_new_tokens": 300})  # regrow
        assert got.tolist() == want.tolist()
        assert got2[0, : got.shape[1]].tolist() == got[0].tolist()
    finally:
        restore(model)


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

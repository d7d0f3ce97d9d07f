"""The fused device sampler against transformers' logits processors, as T3.inference uses them."""
import types

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopPLogitsWarper)

from chatterbox_accel.t3.batch import RowParams, SlotDecoder
from chatterbox_accel.t3.sampling import SamplingParams, cfg_combine, process_logits, sample

V = 8194


def reference_scores(logits, ids, *, temperature, repetition_penalty, min_p, top_p):
    """Exactly the processing sequence of chatterbox 0.1.7's T3.inference."""
    scores = RepetitionPenaltyLogitsProcessor(penalty=float(repetition_penalty))(ids, logits)
    if temperature != 1.0:
        scores = scores / temperature
    scores = MinPLogitsWarper(min_p=min_p)(ids, scores)
    return TopPLogitsWarper(top_p=top_p)(ids, scores)


@pytest.mark.parametrize("temperature,penalty,min_p,top_p", [
    (0.8, 1.2, 0.05, 1.0),   # chatterbox's generate() defaults
    (1.0, 1.0, 0.0, 1.0),
    (1.3, 2.0, 0.1, 0.9),
    (0.5, 1.2, 0.02, 0.8),
])
def test_processing_matches_transformers(temperature, penalty, min_p, top_p):
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = torch.randn(1, V, generator=g) * 3
        ids = torch.randint(0, V, (1, 40), generator=g)
        ids[0, 0] = 6561  # BOS is in the original's id list
        presence = torch.zeros(1, V, dtype=torch.bool)
        presence[0, ids[0]] = True
        params = SamplingParams.make("cpu", cfg_weight=0.5, temperature=temperature,
                                     repetition_penalty=penalty, min_p=min_p, top_p=top_p)
        ours = process_logits(logits, presence, params)
        ref = reference_scores(logits, ids, temperature=temperature, repetition_penalty=penalty,
                               min_p=min_p, top_p=top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"filtered sets differ (trial {trial})"
        p_ours, p_ref = torch.softmax(ours, -1), torch.softmax(ref, -1)
        diff = (p_ours - p_ref).abs().max().item()
        assert diff < 1e-6, f"probabilities differ by {diff:.3g}"


def test_cfg_combine_is_the_original_formula():
    logits = torch.randn(2, V)
    w = torch.tensor(0.7)
    expected = logits[0:1] + 0.7 * (logits[0:1] - logits[1:2])
    assert torch.allclose(cfg_combine(logits, w), expected)
    assert torch.equal(cfg_combine(logits[:1], w), logits[:1])  # no CFG row: conditional only


def test_sampler_draws_from_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]])
    scores = probs.log()
    n = 20000
    counts = torch.bincount(torch.cat([sample(scores) for _ in range(n)]), minlength=5).float() / n
    assert counts[4] == 0, "a zero-probability token was sampled"
    err = (counts - probs[0]).abs().max().item()
    assert err < 0.015, f"empirical frequencies {counts.tolist()} vs {probs[0].tolist()}"


def test_decoder_sampler_marks_each_rows_presence_and_skips_inactive_draws():
    """The decoder's sampler: each row's token marked in its own presence row; an inactive row
    draws no noise from its generator (so a row's stream of random numbers is its own)."""
    presence = torch.zeros(2, V, dtype=torch.bool)
    params = RowParams.empty(2, "cpu")
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    before = gens[1].get_state()
    decoder = types.SimpleNamespace(runner=types.SimpleNamespace(scores=process_logits))
    token = SlotDecoder._sample(decoder, torch.randn(2, V), presence, params, gens, [True, False])
    assert presence[0, token[0]].item() and presence[1, token[1]].item() and presence.sum() == 2
    assert torch.equal(gens[1].get_state(), before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_options(kwargs, match):
    base = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)
    with pytest.raises(ValueError, match=match):
        SamplingParams.make("cpu", **{**base, **kwargs})


def test_turbo_row_processors_match_transformers_row_by_row():
    """Turbo's per-row processors (t3/turbo.py) against the warpers `inference_turbo` builds for
    each row's own options, including the ones it skips (temperature 1 or <= 0, top_k 0,
    top_p 1, penalty 1): the same filtered set and probabilities for every row of one batch."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    from chatterbox_accel.t3.batch import RowParams
    from chatterbox_accel.t3.turbo import TurboParams, TurboRunner, turbo_row_scores

    rows = [dict(temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2),
            dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0),
            dict(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=2.0),
            dict(temperature=1.3, top_k=50, top_p=0.9, repetition_penalty=1.0)]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(rows), V, generator=g) * 3
    ids = torch.randint(0, V, (len(rows), 30), generator=g)
    presence = torch.zeros(len(rows), V, dtype=torch.bool)
    presence[torch.arange(len(rows))[:, None], ids] = True
    params = RowParams.empty(len(rows), "cpu", TurboRunner.row_options)
    for i, o in enumerate(rows):
        params.set(i, TurboRunner.row_values(TurboParams.make(**o), V))
    ours = turbo_row_scores(logits, presence, params)
    for i, o in enumerate(rows):
        ref = logits[i : i + 1].clone()
        if 0 < o["temperature"] != 1.0:
            ref = TemperatureLogitsWarper(o["temperature"])(ids[i : i + 1], ref)
        if o["top_k"] > 0:
            ref = TopKLogitsWarper(o["top_k"])(ids[i : i + 1], ref)
        if o["top_p"] < 1.0:
            ref = TopPLogitsWarper(top_p=o["top_p"])(ids[i : i + 1], ref)
        if o["repetition_penalty"] != 1.0:
            ref = RepetitionPenaltyLogitsProcessor(penalty=o["repetition_penalty"])(ids[i : i + 1], ref)
        assert torch.equal(torch.isinf(ours[i : i + 1]), torch.isinf(ref)), f"row {i}: filtered sets differ"
        assert (torch.softmax(ours[i], -1) - torch.softmax(ref[0], -1)).abs().max() < 1e-6, i

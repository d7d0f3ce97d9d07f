"""The slot decoder (t3/batch.py) on tiny backbones: per-row parity, seeds, join/leave, cache.

Each test names what it guards. Tokens are compared, not lengths (the tiny T3 here has no
stop position: rows end at their own max_new_tokens or at a sampled EOS).
"""
import pytest
import torch

from chatterbox_accel.check import probe_inputs
from chatterbox_accel.checkpoints import tiny_t3
from chatterbox_accel.t3.batch import SlotDecoder, T3Request, cfg_combine_pairs
from chatterbox_accel.t3.decode import T3Runner
from chatterbox_accel.t3.model import sdpa_attention

from conftest import original_forced_logits

OPTS = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)


@pytest.fixture(scope="module")
def t3():
    return tiny_t3(seed=0, layers=2)


@pytest.fixture(scope="module")
def runner(t3):
    return T3Runner(t3, attention=sdpa_attention)


def text_of(t3, n):
    cond, text, _ = probe_inputs(t3, None, 4, 0.5)
    text = text[:, :n].clone()
    text[:, -1] = t3.hp.stop_text_token
    return cond, text


def request(runner, n_text, seed, max_new, **options):
    cond, text = text_of(runner.t3, n_text)
    opts = {**OPTS, **options}
    with torch.inference_mode():
        embeds = runner.build_prompt(cond, text, opts["cfg_weight"] or 1.0)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return T3Request(embeds, opts, max_new, gen, text_len=text.shape[-1], key=(n_text, seed, max_new))


def reseeded(r):
    return T3Request(r.embeds, r.options, r.max_new_tokens, torch.Generator().manual_seed(r.key[1]),
                     text_len=r.text_len, key=r.key)


def mixed(runner):
    return [request(runner, 8, 1, 20), request(runner, 12, 2, 33, top_p=0.9),
            request(runner, 5, 3, 7, cfg_weight=0.0), request(runner, 10, 4, 25, temperature=1.2),
            request(runner, 9, 5, 12, repetition_penalty=2.0, min_p=0.2)]


def test_each_row_decodes_as_it_would_alone(runner):
    """Guards per-row state: positions, masks, options, presence and noise must be the row's own.
    Five requests of different prompt lengths, options and seeds through 2 slots (so three join
    mid-decode) give each request's tokens exactly as a batch of one with the same seed."""
    reqs = mixed(runner)
    decoder = SlotDecoder(runner, 2)
    batched = {r.key: t for r, t in decoder.run(reqs)}
    alone = {r.key: t for r in reqs for _, t in SlotDecoder(runner, 1).run([reseeded(r)])}
    for key, tokens in alone.items():
        assert torch.equal(batched[key], tokens), key
    assert [t.numel() for t in alone.values()] == [20, 33, 7, 25, 12]  # these rows sample no EOS
    # Slots were shared: fewer steps than decoding the requests one after another.
    assert decoder.steps < sum(t.numel() - 1 for t in alone.values())


def test_rows_leave_in_the_order_they_finish_and_free_slots_fill(runner):
    """Guards join/leave: the shortest request returns first, and the queued one is admitted
    into the freed slot while the longer row keeps decoding (no waiting for the whole batch)."""
    reqs = [request(runner, 8, 1, 30), request(runner, 8, 2, 5), request(runner, 8, 3, 6)]
    finished = [r.key[2] for r, _ in SlotDecoder(runner, 2).run(reqs)]
    assert finished == [5, 6, 30]


def test_a_burst_joins_within_the_prefill_budget_with_its_alone_tokens(runner):
    """Guards the engine's prefill budget: while a row decodes, a burst of queued requests joins
    at most `prefill_budget` prompt positions per step (at least one request a step, whatever
    its length), and every request still gets its alone tokens."""
    from chatterbox_accel.t3.batch import prefill_cost

    reqs = [request(runner, 8, 1, 30), request(runner, 12, 2, 10), request(runner, 5, 3, 10),
            request(runner, 10, 4, 10)]
    alone = {r.key: t for r in reqs for _, t in SlotDecoder(runner, 1).run([reseeded(r)])}

    def joins(budget):
        decoder = SlotDecoder(runner, 4)
        decoder.prefill_budget = budget
        first, *burst = [reseeded(r) for r in reqs]
        got, steps = {}, []
        decoder.submit(first)
        for phase in (0, 1):
            if phase:
                for r in burst:
                    decoder.submit(r)
            while decoder.busy:
                events = decoder.step()
                steps.append(sorted(r.key[1] for r, _, _ in events if r.key not in got))  # who joined
                for r, new, _ in events:
                    got.setdefault(r.key, []).extend(new)
                if not phase:
                    break  # the first request decodes; then the burst arrives
        for key, tokens in alone.items():
            assert got[key] == tokens.tolist(), (budget, key)
        return [s for s in steps if s]

    two = prefill_cost(reqs[1]) + prefill_cost(reqs[2])  # seeds 2 and 3 fit one step; 4 waits
    assert joins(two) == [[1], [2, 3], [4]]
    assert joins(1) == [[1], [2], [3], [4]]  # one request a step at least
    assert joins(None) == [[1], [2, 3, 4]]


def test_the_eager_step_computes_up_to_the_last_busy_slot(runner, monkeypatch):
    """Guards the step's width: a decoder of 4 slots with one request runs its 2 rows, not 8
    (the engine's decoder serving one stream), with the tokens of a one-slot decoder; a step
    that keeps its shapes (compiled or captured) still gets every slot."""
    widths = []
    real = runner.slot_logits

    def spy(state, cache, kv_len):
        widths.append((state.slots, cache.batch))
        return real(state, cache, kv_len)

    r = request(runner, 8, 1, 12)
    alone = [t for _, t in SlotDecoder(runner, 1).run([reseeded(r)])][0]
    monkeypatch.setattr(runner, "slot_logits", spy)
    monkeypatch.setattr(runner, "step", spy)  # the eager step is the runner's slot_logits
    wide = [t for _, t in SlotDecoder(runner, 4).run([reseeded(r)])][0]
    assert torch.equal(wide, alone) and set(widths) == {(1, 2)}
    widths.clear()
    monkeypatch.setattr(runner, "step", lambda *a: spy(*a))  # another step: fixed shapes
    assert torch.equal([t for _, t in SlotDecoder(runner, 4).run([reseeded(r)])][0], alone)
    assert set(widths) == {(4, 8)}


def test_seeds_drive_the_tokens(runner):
    """Guards that the private generator is used: another seed gives other tokens, the same
    seed the same ones."""
    a = [t for _, t in SlotDecoder(runner, 1).run([request(runner, 8, 1, 20)])][0]
    b = [t for _, t in SlotDecoder(runner, 1).run([request(runner, 8, 1, 20)])][0]
    c = [t for _, t in SlotDecoder(runner, 1).run([request(runner, 8, 99, 20)])][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unseeded_request_draws_alike_in_any_decoder(runner):
    """Guards the global-RNG path generate() takes: free slots draw no noise, so an unseeded
    request gives the same tokens on the runner's one-slot decoder (generate()'s path) and
    alone in a 3-slot decoder, under the same global seed."""
    r = request(runner, 8, None, 20)
    torch.manual_seed(7)
    single = runner.generate(r)[0]
    torch.manual_seed(7)
    batched = [t for _, t in SlotDecoder(runner, 3).run([r])][0]
    assert torch.equal(single, batched) and single.numel() == 20


def test_teacher_forced_rows_match_the_original_loop(t3, runner, monkeypatch):
    """Guards the per-row forward (RoPE rows, per-row cache writes, masks over a shared kv_len):
    each row of a batch with different prompt lengths, teacher-forced, gives the CFG logits of
    upstream's T3.inference loop within 1e-4 of max |logit| (fp32)."""
    forced = (torch.arange(12) * 797 + 11) % 6561
    lengths = (8, 14, 5)
    reqs = [request(runner, n, 0, 12) for n in lengths]
    batched = SlotDecoder(runner, 3).teacher_forced_logits(reqs, [forced, forced[:6], forced[:9]])
    for n, got, f in zip(lengths, batched, [forced, forced[:6], forced[:9]]):
        cond, text = text_of(t3, n)
        want = original_forced_logits(t3, cond, text, f, 0.5, monkeypatch)
        got = got[: f.numel()]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), n


def test_cfg_zero_row_is_the_conditional_row(runner):
    """Guards the cfg_weight 0 row, which keeps its pair: its logits are the single runner's
    conditional-only (batch 1) logits."""
    forced = (torch.arange(6) * 797 + 11) % 6561
    r = request(runner, 8, 0, 6, cfg_weight=0.0)
    got = SlotDecoder(runner, 2).teacher_forced_logits([request(runner, 11, 0, 6), r], [forced, forced])[1]
    cond, text = text_of(runner.t3, 8)
    with torch.inference_mode():
        embeds = runner.build_prompt(cond, text[:1], 0.0)
        want = runner.teacher_forced_logits(embeds, forced, 0.0)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_cache_is_allocated_once_and_regrown_only_when_needed(runner):
    """Guards the slot cache's life: reused while it fits, replaced when it does not."""
    SlotDecoder(runner, 2).run  # noqa: B018 (constructing allocates nothing)
    list(SlotDecoder(runner, 2).run([request(runner, 8, 1, 10), request(runner, 8, 2, 10)]))
    first = runner.cache
    list(SlotDecoder(runner, 2).run([request(runner, 8, 3, 12), request(runner, 9, 4, 8)]))
    assert runner.cache is first
    list(SlotDecoder(runner, 2).run([request(runner, 8, 3, 400), request(runner, 9, 4, 2)]))
    assert runner.cache is not first and runner.cache.max_len >= 400


def test_cfg_pairs_combine_per_row():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.0, 10.0]])
    out = cfg_combine_pairs(logits, torch.tensor([[0.5], [0.0]]))
    assert torch.equal(out, torch.tensor([[2.5, -0.5], [5.0, 5.0]]))


def test_bad_requests_are_refused(runner):
    with pytest.raises(ValueError, match="temperature"):
        request(runner, 8, 1, 5, temperature=0.0)
    with pytest.raises(ValueError, match="max_batch"):
        SlotDecoder(runner, 0)


@pytest.fixture(scope="module")
def mtl_runner():
    t3 = tiny_t3(seed=0, layers=14, multilingual=True, intermediate_size=256)
    return T3Runner(t3, attention=sdpa_attention)


def test_multilingual_rows_run_their_own_analyzer(mtl_runner, monkeypatch):
    """Guards the per-row alignment analyzer (its maps are the row's own, read once per step for
    the batch): rows with different texts give the tokens and the alignment matrices they give
    alone, and a batch of one without a seed gives the single runner's tokens (which runs
    upstream's analyzer)."""
    import chatterbox_accel.t3.batch as batch

    made = []

    def recording(t3, text_slice):
        made.append(batch_new_analyzer(t3, text_slice))
        return made[-1]

    batch_new_analyzer = batch.new_analyzer
    monkeypatch.setattr(batch, "new_analyzer", recording)
    reqs = [request(mtl_runner, 8, 1, 15), request(mtl_runner, 12, 2, 20), request(mtl_runner, 6, 3, 10)]
    batched = {r.key: t for r, t in SlotDecoder(mtl_runner, 2).run(reqs)}
    in_batch = list(made)  # admission order is request order
    for r, analyzer in zip(reqs, in_batch):
        alone = [t for _, t in SlotDecoder(mtl_runner, 1).run([reseeded(r)])][0]
        assert torch.equal(batched[r.key], alone), r.key
        assert analyzer.alignment.shape == made[-1].alignment.shape
        assert torch.allclose(analyzer.alignment, made[-1].alignment, atol=1e-5), r.key
    r = request(mtl_runner, 12, None, 20)
    torch.manual_seed(3)
    single = mtl_runner.generate(r)[0]
    torch.manual_seed(3)
    assert torch.equal([t for _, t in SlotDecoder(mtl_runner, 2).run([r])][0], single)


def test_unconditional_text_table_is_per_voice_and_order_free(t3, runner, monkeypatch):
    """Guards the shared unconditional text K/V (T3Runner.prefill_slot): the second CFG row's
    text positions come from one table per voice, computed in fixed blocks of 64. A request's
    logits are the same bits whether a longer text (two more blocks) came first or not, and a
    text spanning three blocks still gives upstream's loop within 1e-4 of max |logit|."""
    from chatterbox_accel.t3.prefill import TEXT_BLOCK

    cond, _ = text_of(t3, 8)
    forced = (torch.arange(6) * 797 + 11) % 6561

    def text(n):
        ids = torch.randint(1, 600, (1, n), generator=torch.Generator().manual_seed(n))
        ids[:, 0], ids[:, -1] = t3.hp.start_text_token, t3.hp.stop_text_token
        return ids

    def logits(n):
        with torch.inference_mode():
            r = runner.request(cond, text(n), OPTS, 6)
        return SlotDecoder(runner, 1).teacher_forced_logits([r], [forced])[0], r.prefix_len

    runner.prefixes.clear()
    alone, n = logits(10)
    (_, voice), = runner.prefixes.entries
    assert voice.rows.max_len == n + TEXT_BLOCK  # sized to what it holds: the prefix and one block
    grown, _ = logits(150)  # the same voice's rows grow (a copy) to three blocks
    assert voice.rows.max_len == voice.upto == n + 3 * TEXT_BLOCK
    runner.prefixes.clear()
    long, _ = logits(150)
    assert runner.prefixes.entries[0][1].upto == n + 3 * TEXT_BLOCK  # 150 text positions: 3 blocks
    assert torch.equal(grown, long)
    assert torch.equal(logits(10)[0], alone)
    want = original_forced_logits(t3, cond, text(150).expand(2, -1), forced, 0.5, monkeypatch)
    assert (long[: forced.numel()] - want).abs().max() <= 1e-4 * want.abs().max()


def test_prefix_cache_is_lru_and_bounded_by_count_and_bytes():
    from chatterbox_accel.t3.batch import PrefixCache

    def key(i):
        return torch.full((3, 4), float(i))

    def value(kib):
        return (torch.zeros(kib * 256), torch.zeros(kib * 256))  # 2 x kib KiB of float32

    cache = PrefixCache(size=3, max_bytes=10 * 2048)
    for i in range(3):
        cache.put(key(i), value(2))
    assert cache.get(key(0)) is not None  # 0 is now the most recently used ...
    cache.put(key(3), value(2))  # ... so the 4th voice evicts 1, the least recently used
    assert [int(k[0, 0]) for k, _ in cache.entries] == [3, 0, 2]
    assert cache.get(key(1)) is None
    cache.put(key(4), value(7))  # 14 KiB + 4 + 4 > 20 KiB: the older go until it fits
    assert [int(k[0, 0]) for k, _ in cache.entries] == [4, 3] and cache.nbytes == 18 * 1024
    cache.put(key(5), value(30))  # larger than the bound alone: kept (it is in use), alone
    assert [int(k[0, 0]) for k, _ in cache.entries] == [5]
    assert cache.get(torch.full((3, 5), 5.0)) is None  # another shape is another voice


def test_reading_ids_every_k_steps_gives_the_same_tokens():
    """Guards the GPU path's deferred host reads (sync_every > 1, eos_check_every on CUDA): rows
    that sample EOS or reach max_new_tokens between two reads end exactly where an every-step
    read ends them (the ids decoded past the end are dropped), and queued requests still join."""
    t3 = tiny_t3(seed=1, layers=2, stop_after=9)  # the shaped head makes EOS likely after ~9 tokens
    runner = T3Runner(t3, attention=sdpa_attention)

    def reqs():
        return [request(runner, 8, s, m) for s, m in ((1, 30), (2, 5), (3, 13), (4, 30))]

    every = {r.key: t for r, t in SlotDecoder(runner, 2).run(reqs())}
    deferred = SlotDecoder(runner, 2, sync_every=4)
    late = {r.key: t for r, t in deferred.run(reqs())}
    assert every.keys() == late.keys() and all(torch.equal(every[k], late[k]) for k in every)
    assert any(t[-1] == t3.hp.stop_speech_token for t in every.values())  # some rows stopped at EOS
    assert any(t.numel() == 5 for t in every.values())  # one row stopped at its max_new_tokens


def test_captured_steps_use_batch_buckets_captured_before_decoding(runner):
    """Guards the batch buckets of a captured step (nano-vllm's pattern): with graphs, 3
    requests get a 4-slot decoder (a free slot is a padding row), and every kv bucket of it is
    captured by `warm` before the first step, largest first; without graphs, 3 slots."""
    import types

    from chatterbox_accel.t3.graphs import CudaGraphStep, GuardedStep

    seen = []

    def capture(state, cache, kv_len):
        seen.append((state.slots, kv_len))
        out = runner.slot_logits(state, cache, kv_len).clone()
        return types.SimpleNamespace(replay=lambda: out.copy_(runner.slot_logits(state, cache, kv_len))), out

    assert runner.slots_for(3, 8) == 3
    eager = runner.step
    runner.step = GuardedStep(runner, CudaGraphStep(runner.slot_logits, capture=capture), "fake graphs")
    try:
        assert runner.slots_for(3, 8) == 4 and runner.slots_for(3, 3) == 3 and runner.slots_for(9, 16) == 16
        decoder = runner.warm(4, 300)
        kv = [k for s, k in seen]
        assert seen and all(s == 4 for s, _ in seen) and kv == sorted(kv, reverse=True)
        assert kv[0] == runner.slot_cache(4, 1).max_len and len(set(kv)) == len(kv)
        captured = len(seen)
        out = {r.key: t for r, t in decoder.run([request(runner, 8, s, 10) for s in (1, 2, 3)])}
        assert len(seen) == captured and len(out) == 3  # decoding replayed, never captured
    finally:
        runner.step = eager


def test_requests_arriving_and_leaving_mid_decode(runner):
    """Guards the step-wise API a server uses: a request submitted while another decodes joins
    at the next step and decodes as it would alone; a cancelled one (a gone client) frees its
    slot at once, and a queued one can be cancelled before it starts."""
    a, b, c = request(runner, 8, 1, 30), request(runner, 12, 2, 15), request(runner, 9, 3, 10)
    decoder = SlotDecoder(runner, 2)
    decoder.submit(a)
    got = {id(a): [], id(b): []}

    def step():
        for r, new, _ in decoder.step():
            got[id(r)] += new

    for _ in range(4):
        step()
    decoder.submit(b)
    decoder.submit(c)
    decoder.cancel(c)  # still queued: never starts
    step()
    assert decoder.rows[1] is not None and decoder.rows[1].request is b
    decoder.cancel(a)
    assert decoder.rows[0] is None and len(got[id(a)]) == 6  # its first token and 5 steps
    while decoder.busy:
        step()
    assert set(got) == {id(a), id(b)}
    alone = [t for _, t in SlotDecoder(runner, 1).run([reseeded(b)])][0]
    assert torch.equal(torch.tensor(got[id(b)]), alone) and alone.numel() == 15


def test_a_cancelled_row_with_unread_ids_does_not_stall_the_decoder(runner):
    """Guards deferred reads (sync_every > 1): a row cancelled (or reset away, as claim() does)
    while its ids are unread leaves nothing to read; the next request is admitted and decodes
    as alone. (Before, admissions waited forever for a read of rows that no longer existed.)"""
    decoder = SlotDecoder(runner, 1, sync_every=4)
    a, b = request(runner, 8, 1, 30), request(runner, 12, 2, 9)
    decoder.submit(a)
    decoder.step()
    decoder.step()
    assert decoder.pending  # ids sampled, not read yet
    decoder.cancel(a)
    decoder.submit(b)
    got, steps = [], 0
    while decoder.busy and steps < 50:
        for r, new, _ in decoder.step():
            assert r is b
            got += new
        steps += 1
    alone = [t for _, t in SlotDecoder(runner, 1).run([reseeded(b)])][0]
    assert not decoder.busy and torch.equal(torch.tensor(got), alone)


def test_requests_admitted_together_prefill_as_each_alone(t3, runner):
    """Guards the batched admission prefill (T3Runner.prefill_slots): requests admitted in one
    step run their texts and BOS positions in shared forwards, texts of different lengths padded.
    Each one's logits and the K/V at its prompt's positions must equal its prefill alone (the
    padding lands past each prompt, never in it), in consecutive slots and in a gap-split run;
    and the decoder that admits them together gives each one's tokens as alone."""
    cond, _ = text_of(t3, 8)

    def text(n):
        ids = torch.randint(1, 600, (1, n), generator=torch.Generator().manual_seed(n))
        ids[:, 0], ids[:, -1] = t3.hp.start_text_token, t3.hp.stop_text_token
        return ids

    with torch.inference_mode():
        reqs = [runner.request(cond, text(n), OPTS, 12, torch.Generator().manual_seed(n)) for n in (5, 23, 11)]
    assert all(r.prefix_len > 0 for r in reqs)
    alone = []
    for r in reqs:
        runner.claim()
        cache = runner.slot_cache(1, 64)
        with torch.inference_mode():
            logits = runner.prefill_slots([(0, r)], cache)[0]
        alone.append((logits, cache.k[:, 0:2, :, : r.prompt_len].clone(), cache.v[:, 0:2, :, : r.prompt_len].clone()))
    for slots in ([0, 1, 2], [0, 2, 3]):  # one run; a run of one and a run of two
        runner.claim()
        cache = runner.slot_cache(4, 64)
        with torch.inference_mode():
            got = runner.prefill_slots(list(zip(slots, reqs)), cache)
        for s, r, logits, (want, k, v) in zip(slots, reqs, got, alone):
            scale = want.abs().max()
            assert (logits - want).abs().max() <= 1e-5 * scale
            assert (cache.k[:, 2 * s : 2 * s + 2, :, : r.prompt_len] - k).abs().max() <= 1e-5 * k.abs().max()
            assert (cache.v[:, 2 * s : 2 * s + 2, :, : r.prompt_len] - v).abs().max() <= 1e-5 * v.abs().max()

    def tokens(decoder, indices):
        runner.claim()
        fresh = [T3Request(reqs[i].embeds, reqs[i].options, reqs[i].max_new_tokens,
                           torch.Generator().manual_seed(i), prefix_len=reqs[i].prefix_len, key=i) for i in indices]
        return {req.key: t.tolist() for req, t in decoder.run(fresh)}

    together = tokens(runner.decoder(3), [0, 1, 2])
    assert len(set(map(tuple, together.values()))) == 3
    for i in range(3):
        assert tokens(runner.decoder(1), [i]) == {i: together[i]}

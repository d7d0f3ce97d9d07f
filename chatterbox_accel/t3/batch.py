"""The engine's T3 decoder: requests in slots, one decode step over all of them.

Every T3 decode of an English or Multilingual model runs here: `generate()` (through the
patched `T3.inference`) and `generate_stream()` as a one-slot decoder, `generate_batch()` as a
decoder of up to `max_batch` slots, and a server the same way, submitting requests while
others decode.

A `SlotDecoder` owns `slots` request slots of 2 cache rows each (the CFG pair: conditional,
then text-zeroed; a request with cfg_weight 0 keeps both rows and its combine
`cond + 0 * (cond - uncond)` is exactly `cond`). Per slot: cache position, speech position,
repetition-presence row, sampling options ((S, 1) device tensors), EOS and length limit, and
(with a seed) a private `torch.Generator` that draws its sampling noise, so a row's tokens do
not depend on its batch-mates.

`submit()` queues a request; `step()` admits queued requests into free slots (each prefilled
into its own rows while the others wait that step), runs one forward over all slots through
the runner's installed step (eager, compiled or captured: `t3/graphs.py`), samples each row,
and returns what each request got. A row that samples EOS or reaches its `max_new_tokens`
leaves, freeing its slot; `cancel()` frees one early (a closed stream, a gone client). A free
slot's rows are computed and ignored (padding rows: position 0 of their own rows, nothing they
sample is kept). The host reads the sampled ids every `sync_every` steps (1 on a CPU, where a
read is free; the tokens a row decodes past its EOS before the read are dropped).

Numerics per row: the prompt and positions of `T3.inference`, the CFG combine, upstream's
logits processors (`sampling.process_logits`) and the exponential race; only the matmul's row
count differs between a row alone and in a batch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from .alignment import AnalyzerFeed, new_analyzer
from .sampling import sample, validate

ROW_OPTIONS = ("cfg_weight", "temperature", "repetition_penalty", "min_p", "top_p")


@dataclass(eq=False)  # identity: the decoder finds a request in its queue and slots by `is`
class T3Request:
    """One utterance for the decoder: its prompt embeddings and how to sample it."""

    embeds: torch.Tensor                 # (rows, P, C): the slot's rows' prompts (Llama: the CFG pair; Turbo: 1)
    options: dict                        # the runner's row_options -> number
    max_new_tokens: int                  # tokens the request may decode (Turbo: 1 + max_gen_len)
    generator: torch.Generator | None = None  # a private generator (seeded request), else the global RNG
    text_len: int | None = None          # text tokens in the prompt (the multilingual analyzer reads them)
    key: object = None                   # the caller's handle, returned with the tokens
    prefix_len: int = 0                  # leading positions that are the voice's conditioning, shared by
                                         # the rows and by requests with that voice (prefilled once)

    def __post_init__(self):
        if self.embeds.dim() != 3:
            raise ValueError("a T3Request's embeds must be (rows, P, C)")
        if "min_p" in self.options:  # Llama's options (Turbo's are checked by TurboParams.make)
            validate(**{k: self.options[k] for k in ("temperature", "repetition_penalty", "min_p", "top_p")})
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def prompt_len(self) -> int:
        return self.embeds.shape[1]

    @property
    def max_len(self) -> int:
        """Cache positions the request can fill: its prompt and every token it may decode."""
        return self.prompt_len + self.max_new_tokens


class RowParams:
    """Sampling options per slot as (S, 1) float32 device tensors, one attribute per option name
    (read by the runner's logits processors). `use_top_p`: any active row filters by top-p."""

    def __init__(self, names: tuple, tensors: list, use_top_p: bool = False):
        self.names, self.use_top_p = names, use_top_p
        for name, t in zip(names, tensors):
            setattr(self, name, t)

    @classmethod
    def empty(cls, slots: int, device, names: tuple = ROW_OPTIONS) -> "RowParams":
        return cls(names, [torch.ones(slots, 1, dtype=torch.float32, device=device) for _ in names])

    def set(self, slot: int, options: dict) -> None:
        for name in self.names:
            getattr(self, name)[slot].fill_(float(options[name]))  # a fill: no host tensor copied

    def rows(self, start: int, stop: int) -> "RowParams":
        return RowParams(self.names, [getattr(self, n)[start:stop] for n in self.names], self.use_top_p)


@dataclass
class SlotState:
    """What a decode step reads, per slot: (S,) device tensors updated in place. Their addresses
    never change, so a captured step (a CUDA graph) replays over them."""

    token: torch.Tensor       # (S,) the id fed this step
    pos: torch.Tensor         # (S,) its cache position (0 for a free slot: its own rows' slot 0)
    speech_pos: torch.Tensor  # (S,) its learned speech position

    @classmethod
    def empty(cls, slots: int, device) -> "SlotState":
        return cls(*(torch.zeros(slots, dtype=torch.long, device=device) for _ in range(3)))

    @property
    def slots(self) -> int:
        return self.token.shape[0]

    def rows(self, start: int, stop: int) -> "SlotState":
        """Slots start..stop-1 (views: reads see the decoder's state)."""
        return SlotState(self.token[start:stop], self.pos[start:stop], self.speech_pos[start:stop])


def cfg_combine_pairs(logits: torch.Tensor, cfg_weight: torch.Tensor) -> torch.Tensor:
    """(2S, V) rows in CFG pairs -> (S, V): `cond + cfg * (cond - uncond)` per pair, float32."""
    pairs = logits.float().view(-1, 2, logits.shape[-1])
    cond, uncond = pairs[:, 0], pairs[:, 1]
    return cond + cfg_weight * (cond - uncond)


def race(probs: torch.Tensor, generators: list, active: list[bool]) -> torch.Tensor:
    """Exponential-race noise (S, V): each active row from its own generator (None: the global
    RNG), in slot order; an inactive row draws nothing."""
    noise = torch.ones_like(probs)
    for row, (gen, on) in enumerate(zip(generators, active)):
        if on:
            noise[row].exponential_(1, generator=gen)
    return noise


def shared_prefix(embeds: torch.Tensor) -> int:
    """How many leading positions the CFG pair's two rows have equal (keeping the last one
    out, so the suffix is never empty)."""
    differ = (embeds[0, :-1] != embeds[1, :-1]).any(dim=-1).nonzero()
    return int(differ[0, 0]) if differ.numel() else embeds.shape[1] - 1


PREFIX_CACHE_BYTES = 1 << 30  # what a runner's voice prefixes may hold (~16 English voices in fp32)


class PrefixCache:
    """What a runner keeps per voice (the conditioning prefix's K/V), by the prefix's own
    embeddings (compared exactly), least recently used first out. Bounded by `size` voices and
    by `max_bytes` (the newest entry always stays, so a voice larger than the bound still runs:
    it is just not kept beside others). The runner keeps one, so a voice's prefix runs once
    across calls too."""

    def __init__(self, size: int = 16, max_bytes: int = PREFIX_CACHE_BYTES):
        self.entries: list = []  # (key, value), most recently used first
        self.size, self.max_bytes = size, max_bytes

    def get(self, embeds):
        for i, (key, value) in enumerate(self.entries):
            if key.shape == embeds.shape and torch.equal(key, embeds):
                self.entries.insert(0, self.entries.pop(i))
                return value
        return None

    def put(self, embeds, value):
        self.entries.insert(0, (embeds.clone(), value))
        self.fit()
        return value

    def fit(self) -> None:
        """Evict the least recently used entries past the bounds (call after an entry grew)."""
        while len(self.entries) > 1 and (len(self.entries) > self.size or self.nbytes > self.max_bytes):
            self.entries.pop()

    @property
    def nbytes(self) -> int:
        return sum(value_bytes(value) for _, value in self.entries)

    def clear(self) -> None:
        self.entries = []


def value_bytes(value) -> int:
    """Bytes of a prefix entry: an object with a `rows` cache (T3Runner's) or a tuple of tensors."""
    if hasattr(value, "rows"):
        return value.rows.nbytes
    return sum(t.numel() * t.element_size() for t in value)


def prefill_cost(request: T3Request) -> int:
    """Positions a request's prefill runs per row beyond its voice's shared prefix."""
    return request.prompt_len - request.prefix_len


@dataclass
class _Slot:
    request: T3Request
    tokens: list = field(default_factory=list)
    feed: AnalyzerFeed | None = None
    stopped: bool = False  # ended without a token (all scores -inf)


class SlotDecoder:
    """Batched decoding over `slots` slots for one runner (`T3Runner` or Turbo's `TurboRunner`:
    its backbone, kernels, speech head, prompt, installed step, sampler hooks and cache).
    `runner.decoder(slots)` keeps one per slot count."""

    @torch.inference_mode()  # every tensor the decoder keeps is an inference tensor
    def __init__(self, runner, slots: int, *, sync_every: int = 1):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {slots!r}")
        self.runner, self.slots = runner, slots
        self.eos, self.bos = runner.eos, runner.bos
        self.multilingual = bool(runner.heads)
        # The analyzer reads each step's tokens on the host, so Multilingual reads every step.
        self.sync_every = 1 if self.multilingual else max(1, int(sync_every))
        device = runner.backbone.device
        self.state = SlotState.empty(slots, device)
        self.presence = torch.zeros(slots, runner.hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
        self.on = torch.zeros(slots, dtype=torch.bool, device=device)  # slots holding a request (device copy)
        self.params = RowParams.empty(slots, device, runner.row_options)
        self.rows: list[_Slot | None] = [None] * slots
        self.queue: deque[T3Request] = deque()
        self.cache = None
        self.pending: list[torch.Tensor] = []  # sampled ids (S,) of steps the host has not read yet
        self.failed: list[tuple[T3Request, Exception]] = []  # requests whose admission failed (take_failed)
        # Prompt positions prefilled per step while other rows decode (None: no bound). A burst of
        # arrivals then delays the running rows' next token by about this much prefill, not all
        # of it; at least one request is admitted each step whatever its length.
        self.prefill_budget: int | None = None
        self.steps = 0  # decode steps run (for metrics)

    # ---- requests -------------------------------------------------------------------------------
    def submit(self, request: T3Request) -> None:
        """Queue a request; it joins a free slot at a step boundary."""
        if request.embeds.shape[0] != self.runner.rows_per_slot:
            raise ValueError(f"a request for this T3 has {self.runner.rows_per_slot} prompt rows "
                             f"(got {request.embeds.shape[0]}); build it with the runner's request()")
        if self.multilingual and request.text_len is None:
            raise ValueError("a multilingual T3 decode needs text_len (its alignment analyzer reads it)")
        self.queue.append(request)

    def cancel(self, request: T3Request) -> None:
        """Drop a request: out of the queue, or out of its slot (which is free from the next step)."""
        self.queue = deque(r for r in self.queue if r is not request)
        for s, row in enumerate(self.rows):
            if row is not None and row.request is request:
                self._free(s)

    def reset(self) -> None:
        """Drop every request (queued or decoding)."""
        self.queue.clear()
        self._free_rows()

    def drop_cache(self) -> None:
        """The runner reallocated its cache: rows decoding in the old one are dropped (queued
        requests stay), and the next admission takes the new one."""
        self._free_rows()
        self.cache = None

    def _free_rows(self) -> None:
        for s in range(self.slots):
            if self.rows[s] is not None:
                self._free(s)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(row is not None for row in self.rows)

    # ---- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[T3Request, list[int], bool]]:
        """Admit queued requests into free slots, then one decode step over every slot.
        Returns `(request, new ids, finished)` for each request that got ids (a finished one's
        end at its EOS, if it sampled one). With `sync_every` > 1 most steps return nothing:
        their ids arrive with the step that reads them."""
        events: dict[int, tuple] = {}
        if self.pending and all(row is None for row in self.rows):
            self.pending = []  # unread ids of rows already gone (cancelled, reset): nothing to read
        if not self.pending:  # admissions wait for the host to know every row's tokens
            self._admit(events)
        active = [row is not None for row in self.rows]
        if any(active):
            self._decode(active, events)
        return list(events.values())

    def _admit(self, events) -> None:
        """Queued requests into free slots, prefilled together (`runner.prefill_slots`); a request
        that ends at its first token frees its slot for the next step. A request whose prefill or
        first sample fails leaves its slot free again and goes to `failed`; the others go on (a
        joint prefill that fails is retried one request at a time, so only the culprit fails)."""
        admitted, spent = [], 0
        decoding = any(row is not None for row in self.rows)
        for s in range(self.slots):
            if self.rows[s] is not None or not self.queue:
                continue
            if self.cache is None or self.cache.max_len < self.queue[0].max_len:
                if admitted or decoding:
                    break  # a longer request waits for the decoder to drain, then the cache grows
                self.cache = self.runner.slot_cache(self.slots, max(r.max_len for r in self.queue))
            cost = prefill_cost(self.queue[0])
            if decoding and admitted and self.prefill_budget is not None and spent + cost > self.prefill_budget:
                break  # the rest wait for the next step: the running rows are not held up longer
            spent += cost
            request = self.queue.popleft()
            self.rows[s] = _Slot(request)
            admitted.append((s, request))
        if not admitted:
            return
        runner = self.runner
        if len(admitted) > 1 and not self.multilingual:  # its analyzer reads each prefill's maps: one by one
            try:
                logits = runner.prefill_slots(admitted, self.cache)
            except Exception:  # one of them fails it: each alone below, so only that one fails
                logits = None
            if logits is not None:
                for (s, request), lg in zip(admitted, logits):
                    self._begin(s, request, lg, events)
                return
        for s, request in admitted:
            try:
                lg = runner.prefill_slots([(s, request)], self.cache)[0]
            except Exception as exc:
                self._fail(s, request, exc)
                continue
            self._begin(s, request, lg, events)

    def _begin(self, s: int, request: T3Request, logits: torch.Tensor, events) -> None:
        """Slot `s` starts `request` from its prefill logits (its first token sampled)."""
        row = self.rows[s]
        try:
            first = self._start(s, request, logits)
        except Exception as exc:
            self._fail(s, request, exc)
            return
        if first < 0:  # every score -inf: nothing to sample
            row.stopped = True
        else:
            row.tokens.append(first)
        self._record(events, s, row.tokens[-1:])

    def _fail(self, s: int, request: T3Request, exc: Exception) -> None:
        """Roll slot `s` back (free, its state cleared) and record why `request` failed."""
        self._free(s)
        self.failed.append((request, exc))

    def take_failed(self) -> list[tuple[T3Request, Exception]]:
        """Requests that failed to start since the last call (their slots are free again)."""
        failed, self.failed = self.failed, []
        return failed

    def holds(self, request: T3Request) -> bool:
        """Whether `request` is still queued or decoding here (a reset drops it)."""
        return any(r is request for r in self.queue) or any(
            row is not None and row.request is request for row in self.rows)

    def _start(self, s: int, request: T3Request, logits: torch.Tensor) -> int:
        """Slot `s`'s state for `request`, prefilled (`logits`: its rows' last-position
        logits), and its first token sampled."""
        runner, P = self.runner, request.prompt_len
        row = self.rows[s]
        if self.multilingual:
            end = P - 2  # conditioning + text + BOS + BOS: the text is the slice T3.inference gives it
            row.feed = AnalyzerFeed(new_analyzer(runner.t3, (end - request.text_len, end)), runner.llama,
                                    runner.heads, first_token=self.bos)
        # In-place fills and scatters with Python scalars: indexed assignment of `True` copies a
        # host tensor to the device (a sync per call on CUDA).
        self.presence[s].zero_()
        self.presence[s, self.bos : self.bos + 1].fill_(True)  # the original's id list starts with BOS
        self.params.set(s, request.options)
        self.params.use_top_p = bool(request.options["top_p"] < 1.0)
        combined = runner.combine(logits, self.params.rows(s, s + 1))
        if row.feed is not None:
            combined = row.feed(combined)
        first = self._sample(combined, self.presence[s : s + 1], self.params.rows(s, s + 1),
                             [request.generator], [True])
        if runner.first_presence_only:  # from now on, the generated tokens only
            self.presence[s].zero_()
            self.presence[s].scatter_(0, first[:1].clamp_min(0), True)
        self.state.token[s : s + 1].copy_(first[:1].clamp_min(0))
        self.state.pos[s : s + 1].fill_(P)
        self.state.speech_pos[s : s + 1].fill_(1)
        self.on[s : s + 1].fill_(True)
        return int(first[0])

    def _decode(self, active, events) -> None:
        runner, state = self.runner, self.state
        self.params.use_top_p = any(on and row.request.options["top_p"] < 1.0 for on, row in zip(active, self.rows))
        newest = max(row.request.prompt_len + len(row.tokens) + len(self.pending) - 1
                     for row in self.rows if row is not None)
        kv_len = runner.kv_len_for(newest, self.cache)
        self.cache.ensure(kv_len)  # outside the step: a captured step must not branch on it
        n, step_state, params, cache = self.width(active), state, self.params, self.cache
        if n < self.slots:  # the free slots past the last busy one are not computed
            R = runner.rows_per_slot
            step_state, params, cache = state.rows(0, n), params.rows(0, n), cache.rows(0, R * n)
        logits = runner.step(step_state, cache, kv_len)  # (rows_per_slot * n, V)
        combined = runner.combine(logits, params)
        if self.multilingual:
            combined = self._analyze(combined, active[:n])
        generators = [row.request.generator if row is not None else None for row in self.rows[:n]]
        nxt = self._sample(combined, self.presence[:n], params, generators, active[:n])
        if n < self.slots:
            nxt = torch.cat([nxt, nxt.new_full((self.slots - n,), -1)])
        self.steps += 1
        on = self.on  # the host's `active`, kept on the device (no copy per step)
        state.token.copy_(torch.where(on & (nxt >= 0), nxt, state.token))
        state.pos.add_(on.long())
        state.speech_pos.add_(on.long())
        self.pending.append(nxt)
        if len(self.pending) >= self.sync_every or self._must_sync():
            self._sync(events)

    def width(self, active: list) -> int:
        """Slots a decode step computes: with the eager step, up to the last busy one (a server's
        decoder of 8 slots serving one request runs 2 rows, not 16: on a CPU the step's cost
        grows with its rows); a compiled or captured step keeps its shapes: every slot."""
        if self.runner.step != self.runner.slot_logits:
            return self.slots
        return max(s for s, on in enumerate(active) if on) + 1

    def _must_sync(self) -> bool:
        """A row reaches its max_new_tokens with the ids not read yet (the host must free its slot
        before it decodes past its cache), or a request waits for a slot."""
        n = len(self.pending)
        return bool(self.queue) or any(row is not None and len(row.tokens) + n >= row.request.max_new_tokens
                                       for row in self.rows)

    def _sync(self, events) -> None:
        """The one host read of the pending steps' ids; each row takes its ids up to its end."""
        ids = torch.stack(self.pending).T.tolist()  # (S, steps)
        self.pending = []
        for s, row in enumerate(self.rows):
            if row is None:
                continue
            new = []
            for token in ids[s]:
                if token < 0:  # every score was -inf (Turbo: upstream stops there, adding nothing)
                    row.stopped = True
                    break
                row.tokens.append(token)
                new.append(token)
                if self._finished(row):
                    break
            self._record(events, s, new)

    def _finished(self, row: _Slot) -> bool:
        return row.stopped or self.runner.finished(row.tokens, row.request.max_new_tokens)

    def _record(self, events, s: int, new: list[int]) -> None:
        """Report slot `s`'s new ids (already in its tokens); a finished row frees its slot."""
        row = self.rows[s]
        done = self._finished(row)
        if s in events and events[s][0] is row.request:  # admitted and read in the same step
            new = events[s][1] + new
        events[s] = (row.request, new, done)
        if done:
            self._free(s)

    @torch.inference_mode()
    def _free(self, s: int) -> None:
        self.rows[s] = None
        self.on[s : s + 1].fill_(False)
        for t in (self.state.pos, self.state.token, self.state.speech_pos):
            t[s : s + 1].fill_(0)  # a free slot computes token 0 at position 0 of its own rows

    def _analyze(self, combined, active):
        """Multilingual: each active row's upstream analyzer on its own maps (one host copy of
        the spied maps for the whole batch), between CFG and the processors, as T3.inference."""
        llama, heads = self.runner.llama, self.runner.heads
        maps = torch.stack([llama.spied[layer][0::2] for layer, _ in heads]).cpu()  # (3, S, 1, kv)
        rows = []
        for s, on in enumerate(active):
            row = combined[s : s + 1]
            if on:
                feed = self.rows[s].feed
                feed.analyzer.last_aligned_attns = [m[s] for m in maps]
                row = feed.analyzer.step(row, next_token=self.rows[s].tokens[-1])
            rows.append(row)
        return torch.cat(rows)

    def _sample(self, combined, presence, params: RowParams, generators, active):
        """The runner's processors, then each row's exponential race; -1 where a row's scores
        are all -inf (it stops)."""
        scores = self.runner.scores(combined, presence, params)
        nxt = sample(scores, noise=lambda probs: race(probs, generators, active))  # (S,)
        nxt = torch.where(torch.isneginf(scores).all(dim=-1), -1, nxt)
        presence.scatter_(1, nxt.clamp_min(0)[:, None], True)  # no host copy (reset on admit)
        return nxt

    # ---- whole decodes --------------------------------------------------------------------------
    def run(self, requests, progress=None):
        """Decode every request; yields `(request, tokens)` as each finishes (1-D ids ending at
        the first EOS if any). `progress()` is called once per finished request."""
        got = {}
        for request in requests:
            self.submit(request)
            got[id(request)] = []
        while self.busy:
            events = self.step()
            for request, exc in self.take_failed():
                raise exc
            for request, new, done in events:
                got[id(request)] += new
                if done:
                    if progress is not None:
                        progress()
                    yield request, torch.tensor(got.pop(id(request)), dtype=torch.long)

    def blocks(self, request: T3Request, first_block: int | None = None, block: int | None = None):
        """Decode one request, yielding `(new ids (1-D), finished)` every `block` tokens
        (`first_block` for the first yield; without sizes, one yield at the end). Closing the
        generator early frees the request's slot."""
        self.submit(request)
        got, emitted, done = [], 0, False
        target = first_block or request.max_new_tokens
        try:
            while True:
                events = self.step()
                for r, exc in self.take_failed():
                    if r is request:
                        raise exc
                for r, new, finished in events:
                    if r is request:
                        got += new
                        done = done or finished
                if not done and not self.holds(request):  # dropped (a reset): never spin on it
                    raise RuntimeError("this decode's request was dropped from the T3 decoder (another "
                                       "decode reset it); start it again")
                if done or len(got) - emitted >= target:
                    yield torch.tensor(got[emitted:], dtype=torch.long), done
                    if done:
                        return
                    emitted, target = len(got), block or request.max_new_tokens
        finally:
            if not done:
                self.cancel(request)

    @torch.inference_mode()
    def teacher_forced_logits(self, requests, forced: list[torch.Tensor]) -> list[torch.Tensor]:
        """All requests in one batch (one slot each, `slots` >= their number), each fed its
        `forced` tokens through the runner's INSTALLED step (what decoding runs): the
        CFG-combined logits (N_i + 1, V) after its prompt and after each forced token."""
        if len(requests) > self.slots:
            raise ValueError(f"{len(requests)} requests for {self.slots} slots")
        self.reset()
        runner, state = self.runner, self.state
        steps = max(f.numel() for f in forced)
        self.cache = runner.slot_cache(self.slots, max(r.prompt_len for r in requests) + steps + 1)
        outs = []
        for s, r in enumerate(requests):
            self.params.set(s, r.options)
            logits = runner.prefill_slot(r, self.cache, s)  # the prefill decoding uses
            outs.append([runner.combine(logits, self.params.rows(s, s + 1))])
            state.pos[s], state.speech_pos[s] = r.prompt_len, 1
        for n in range(steps):
            for s, f in enumerate(forced):
                state.token[s] = int(f[n]) if n < f.numel() else 0
            kv_len = runner.kv_len_for(int(state.pos.max()), self.cache)
            self.cache.ensure(kv_len)
            combined = runner.combine(runner.step(state, self.cache, kv_len), self.params)
            for s, f in enumerate(forced):
                if n < f.numel():
                    outs[s].append(combined[s : s + 1])
            state.pos[: len(requests)] += 1
            state.speech_pos[: len(requests)] += 1
        self._clear_state()
        return [torch.cat(o) for o in outs]

    def _clear_state(self) -> None:
        for t in (self.state.token, self.state.pos, self.state.speech_pos):
            t.zero_()

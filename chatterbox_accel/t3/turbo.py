"""Turbo's T3 (a GPT-2 medium) on a static KV cache: `T3.inference_turbo`, fast.

It reproduces `T3.inference_turbo` (chatterbox 0.1.7) token for token in distribution:
- prompt = `prepare_input_embeds(cond, text, BOS)` (no CFG, no learned positions); GPT-2 adds
  its own absolute position embedding `wpe`; each sampled token is fed back as `speech_emb` only;
- logits processors in upstream's order: temperature (skipped unless 0 < t != 1) -> top-k (if
  k > 0) -> top-p (if p < 1) -> repetition penalty (if != 1) -> softmax -> sample. The
  penalty's id list is BOS for the first token, then only the tokens generated so far;
- the first token never stops the loop (upstream checks EOS only inside its loop); up to
  1 + max_gen_len tokens; a trailing EOS is removed; if every score is -inf, it stops there.

Decoding runs on the engine's decoder (t3/batch.py), one row per slot, so one request
(`generate()`, `generate_stream()`) and many (`generate_batch()`) take the same path. The
conditioning prefix's K/V (speaker + voice prompt: 376 of the ~390 prompt positions) is computed
once per voice and copied into each slot that uses it (`CachedRunner.prefill_slot`): a call
with a known voice runs ~15 prompt positions instead of ~390.

The GPT-2 forward reuses the HF modules and weights (`ln_1`, `c_attn`, `c_proj`, `mlp`, `ln_f`,
`wpe`); attention is SDPA over the static cache (flash-attn where selected), never eager.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from .batch import T3Request
from .cache import StaticKVCache
from .decode import CachedRunner
from .model import sdpa_attention
from .patch import FastInference
from .kernels import project

logger = logging.getLogger(__name__)

# T3.inference_turbo's keyword defaults in chatterbox-tts 0.1.7.
TURBO_DEFAULTS = dict(temperature=0.8, top_k=1000, top_p=0.95, repetition_penalty=1.2, max_gen_len=1000)


def conv1d(module, x):
    """transformers' GPT-2 `Conv1D`: x @ W + b, with W stored (in, out)."""
    out = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), module.weight)
    return out.view(*x.shape[:-1], module.weight.shape[1])


class FastGPT2:
    """`forward(x, input_pos, cache, kv_len)` for one HF GPT2Model; returns ln_f hidden."""

    def __init__(self, gpt2, attention=sdpa_attention):
        cfg = gpt2.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(cfg, "scale_attn_weights", True):
            raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not implemented")
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention is not a chatterbox Turbo T3")
        self.gpt2 = gpt2
        self.blocks = list(gpt2.h)
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.attention = attention
        self.kernels = None  # KernelTable (CPU), set by the runner after measuring

    @staticmethod
    def plain(module, x):
        """The original's kernel for a Conv1D projection or the speech head (an nn.Linear)."""
        return conv1d(module, x) if hasattr(module, "nf") else module(x)

    def conv1d(self, module, x):
        return project(self.kernels, module, x, self.plain)

    def linear(self, module, x):  # the speech head, an nn.Linear
        return project(self.kernels, module, x, self.plain)

    def linears(self) -> list:
        """The Conv1D modules a decode step multiplies by, block by block."""
        return [m for b in self.blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]

    @property
    def dtype(self):
        return self.gpt2.ln_f.weight.dtype

    @property
    def device(self):
        return self.gpt2.ln_f.weight.device

    def new_cache(self, batch: int, max_len: int, lazy: bool = False) -> StaticKVCache:
        return StaticKVCache(len(self.blocks), batch, self.n_heads, max_len, self.head_dim, self.dtype,
                             self.device, lazy)

    def forward(self, x, input_pos, cache: StaticKVCache, kv_len: int):
        """x (B, S, C) at positions input_pos: (S,) shared by every row, or (B, 1) per row (the
        decoder's slots) -> ln_f hidden (B, S, C)."""
        B, S, C = x.shape
        x = x + (self.gpt2.wpe(input_pos)[None] if input_pos.dim() == 1 else self.gpt2.wpe(input_pos))
        for i, block in enumerate(self.blocks):
            q, k, v = self.conv1d(block.attn.c_attn, block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, S, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            k_buf, v_buf = cache.update(i, input_pos, k, v)
            out = self.attention(q, k_buf, v_buf, input_pos, kv_len)  # (B, H, S, D)
            x = x + self.conv1d(block.attn.c_proj, out.transpose(1, 2).reshape(B, S, C))
            mlp = block.mlp
            x = x + self.conv1d(mlp.c_proj, mlp.act(self.conv1d(mlp.c_fc, block.ln_2(x))))
        return self.gpt2.ln_f(x)


@dataclass
class TurboParams:
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float

    @classmethod
    def make(cls, *, temperature, top_k, top_p, repetition_penalty):
        """Upstream's options, with the errors its processors would raise, raised up front."""
        if top_k > 0 and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise ValueError(f"top_k must be an integer (0 disables it), got {top_k!r}")
        if top_p < 0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        if repetition_penalty != 1.0 and not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        return cls(float(temperature), int(top_k), float(top_p), float(repetition_penalty))


def turbo_row_scores(logits: torch.Tensor, presence: torch.Tensor, p) -> torch.Tensor:
    """(S, V) logits -> scores through `inference_turbo`'s processors in upstream's order
    (temperature, top-k, top-p, repetition penalty), each row with its own options ((S, 1)
    tensors from `TurboRunner.request`, where a processor upstream would skip gets its exact
    no-op value: temperature 1, top_k V, top-p cut 0, penalty 1)."""
    scores = logits.float() / p.temperature
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, p.top_k.long() - 1)  # (S, 1)
    scores = scores.masked_fill(scores < kth, float("-inf"))
    sorted_scores, order = torch.sort(scores, descending=False)
    remove_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= p.top_p_cut
    remove_sorted[..., -1:] = False
    scores = scores.masked_fill(remove_sorted.scatter(1, order, remove_sorted), float("-inf"))
    r = p.repetition_penalty
    return torch.where(presence, torch.where(scores < 0, scores * r, scores / r), scores)


class TurboRunner(CachedRunner):
    """Fast `inference_turbo` for one Turbo `T3`: the engine's decoder with one row per slot
    (no CFG). Owns the KV cache."""

    rows_per_slot = 1
    row_options = ("temperature", "top_k", "top_p_cut", "repetition_penalty")
    first_presence_only = True  # upstream's penalty list: BOS for the first token, then the generated ones

    def __init__(self, t3, *, attention=sdpa_attention, dtype=None, kv_bucket: int | None = 32,
                 static_cache=True, sync_every: int = 1):
        self.t3, self.hp = t3, t3.hp
        self.tfmr, self.speech_head = t3.tfmr, t3.speech_head
        if dtype is not None and dtype != t3.speech_head.weight.dtype:
            # Reduced precision runs on a private copy: the user's model is never cast.
            self.tfmr = copy.deepcopy(t3.tfmr).to(dtype)
            self.speech_head = copy.deepcopy(t3.speech_head).to(dtype)
        self.gpt2 = FastGPT2(self.tfmr, attention)
        self.bos, self.eos = self.hp.start_speech_token, self.hp.stop_speech_token
        self._init_cache(kv_bucket, static_cache, sync_every)

    @property
    def backbone(self):
        return self.gpt2

    def build_prompt(self, t3_cond, text_tokens) -> tuple[torch.Tensor, int]:
        """(prompt embeddings (1, P, C), length of its conditioning prefix)."""
        text_tokens = torch.atleast_2d(text_tokens).to(self.t3.device)
        bos = self.hp.start_speech_token * torch.ones_like(text_tokens[:, :1])
        return self.t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens,
                                            speech_tokens=bos, cfg_weight=0.0)

    def request(self, t3_cond, text_tokens, params: TurboParams, max_gen_len: int, generator=None,
                key=None) -> T3Request:
        """A decoder request: up to 1 + max_gen_len tokens, as `inference_turbo` samples them.
        Each processor upstream would skip gets its exact no-op value (the top-p cut is
        1 - top_p taken in double precision, as upstream compares against it)."""
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        embeds, len_cond = self.build_prompt(t3_cond, text_tokens)
        options = self.row_values(params, self.hp.speech_tokens_dict_size)
        return T3Request(embeds, options, 1 + int(max_gen_len), generator, key=key, prefix_len=len_cond)

    @staticmethod
    def row_values(params: TurboParams, vocab: int) -> dict:
        """The per-row option values `turbo_row_scores` reads (plus top_p itself)."""
        return dict(temperature=params.temperature if 0 < params.temperature != 1.0 else 1.0,
                    top_k=min(params.top_k, vocab) if params.top_k > 0 else vocab,
                    top_p=params.top_p, top_p_cut=1 - params.top_p if params.top_p < 1.0 else 0.0,
                    repetition_penalty=params.repetition_penalty)

    # ---- the decoder's hooks (see CachedRunner) -------------------------------------------------
    @staticmethod
    def combine(logits, params) -> torch.Tensor:
        return logits.float()  # one row per slot: nothing to combine

    @staticmethod
    def scores(combined, presence, params) -> torch.Tensor:
        return turbo_row_scores(combined, presence, params)

    def finished(self, tokens: list, max_new_tokens: int) -> bool:
        """Upstream checks EOS only inside its loop: a first token EOS does not stop it."""
        return len(tokens) >= max_new_tokens or (len(tokens) > 1 and tokens[-1] == self.eos)

    def slot_logits(self, state, cache, kv_len: int) -> torch.Tensor:
        """The decode step's forward: each slot's `state.token` (its speech embedding only) at its
        own position; speech logits (S, V)."""
        x = self.t3.speech_emb(state.token)[:, None]  # (S, 1, C)
        hidden = self.gpt2.forward(x.to(self.gpt2.dtype), state.pos[:, None], cache, kv_len)
        return self.gpt2.linear(self.speech_head, hidden[:, -1])

    def token_blocks(self, request: T3Request, first_block: int | None = None, block: int | None = None):
        """As `CachedRunner.token_blocks`, with a trailing EOS dropped, as upstream drops it (an EOS
        sampled first does not stop upstream's loop, and stays in its output, as here)."""
        for ids, finished in super().token_blocks(request, first_block, block):
            if finished and ids.numel() and int(ids[-1]) == self.eos:
                ids = ids[:-1]
            yield ids, finished

    @torch.inference_mode()
    def teacher_forced_logits(self, embeds, len_cond: int, forced: torch.Tensor) -> torch.Tensor:
        """Speech logits (N+1, V) after the prompt and after each forced token (N,), through the
        prefill decoding uses (the voice prefix, then the rest) and the installed step."""
        self.claim()
        decoder = self.decoder(1)
        request = T3Request(embeds, dict(temperature=1.0, top_k=1, top_p_cut=0.0, repetition_penalty=1.0,
                                         top_p=1.0), forced.numel() + 1, prefix_len=len_cond)
        return decoder.teacher_forced_logits([request], [forced.view(-1)])[0].float()


@torch.inference_mode()
def turbo_reference_logits(t3, embeds, forced) -> torch.Tensor:
    """The untouched HF GPT-2 over prompt + forced tokens in one forward: logits (N+1, V)."""
    seq = torch.cat([embeds, t3.speech_emb(forced.view(1, -1))], dim=1)
    hidden = t3.tfmr(inputs_embeds=seq, use_cache=False)[0]
    return t3.speech_head(hidden[0, embeds.shape[1] - 1 :]).float()


class FastTurboInference(FastInference):
    """wrapt wrapper for `T3.inference_turbo`: the fast runner, or the original on failure
    (the fallback logic is `FastInference`'s)."""

    method = "T3.inference_turbo"

    def unsupported(self, args, kwargs) -> str | None:
        return _unsupported(args, kwargs)

    def stream(self, kwargs, first_block: int | None = None, block: int | None = None, generator=None):
        opts = {**TURBO_DEFAULTS, **kwargs}
        params = TurboParams.make(temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                                  repetition_penalty=opts["repetition_penalty"])
        with torch.inference_mode():
            request = self.runner.request(opts["t3_cond"], opts["text_tokens"], params, int(opts["max_gen_len"]),
                                          generator=generator)
        return self.runner.token_blocks(request, first_block, block)


TurboRunner.wrapper = FastTurboInference  # what replaces `T3.inference_turbo`


def _unsupported(args, kwargs) -> str | None:
    if args:
        return "positional arguments"
    unknown = set(kwargs) - set(TURBO_DEFAULTS) - {"t3_cond", "text_tokens"}
    if unknown:
        return f"unknown arguments {sorted(unknown)}"
    if "t3_cond" not in kwargs or "text_tokens" not in kwargs:
        return "t3_cond or text_tokens missing"
    if torch.atleast_2d(kwargs["text_tokens"]).shape[0] != 1:
        return "a batch of texts"
    return None

"""The T3 transformer forward over a static KV cache, reusing the HF LlamaModel's own modules.

No weights are copied (except for an opt-in reduced-precision copy made by the caller): each
layer uses the original `q_proj`, ..., `mlp`, `input_layernorm` modules and their weights, so
the only differences from `LlamaModel.forward` are the ones that make it fast:
- the KV cache is a preallocated `StaticKVCache` written at `input_pos` (a device tensor);
- RoPE cos/sin come from a table precomputed once with the model's own `rotary_emb`;
- attention is SDPA or flash-attn over the first `kv_len` cache slots with a positional mask,
  never the eager path that `output_attentions=True` forces; no hidden states are kept;
- on CPU, matmuls run through the kernel table the runner chose by measurement (kernels.py:
  oneDNN-packed, GEMV-oriented or reduced-precision copies), else `F.linear` as the original;
- where a caller needs attention maps (the multilingual alignment analyzer reads three heads),
  only those heads' probabilities are computed, beside the fast attention (see `spy_heads`).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import StaticKVCache
from .kernels import project

logger = logging.getLogger(__name__)


def linear(module, x):
    """`module(x)` for an nn.Linear: `F.linear`, the original's own kernel (the plain path)."""
    return F.linear(x, module.weight, module.bias)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_table(llama, max_len: int, device, dtype):
    """cos/sin (max_len, head_dim) for positions 0..max_len-1, from the model's rotary_emb,
    computed in float32 and only then cast to `dtype`."""
    positions = torch.arange(max_len, device=device)[None]  # (1, T)
    probe = torch.empty(1, dtype=torch.float32, device=device)
    cos, sin = fp32_rotary(llama.rotary_emb)(probe, positions)  # float32, (1, T, D)
    return cos[0].to(dtype), sin[0].to(dtype)


def fp32_rotary(rotary):
    """`rotary` itself when its frequencies are float32; else a copy with them recomputed in
    float32 from its config by transformers' own init function. Casting a model to bf16 casts
    the `inv_freq` buffer too: a phase error of ~1 rad by position ~500 in every table built
    from it."""
    if rotary.inv_freq.dtype == torch.float32:
        return rotary
    import copy

    init = getattr(rotary, "rope_init_fn", None)
    if init is None:
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type == "default":
            init = rotary.compute_default_rope_parameters
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            init = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, scaling = init(rotary.config, rotary.inv_freq.device)
    fresh = copy.deepcopy(rotary)
    fresh.inv_freq = inv_freq.to(torch.float32)
    if hasattr(fresh, "original_inv_freq"):
        fresh.original_inv_freq = fresh.inv_freq.clone()
    fresh.attention_scaling = scaling
    return fresh


def sdpa_attention(q, k_buf, v_buf, input_pos, kv_len: int):
    """q (B, H, S, D); k_buf/v_buf (B, H, T_max, D); attends to slots <= each query's position.
    input_pos: (S,) shared by every row, or (B, S) per row (the batch engine's slots)."""
    keys, values = k_buf[:, :, :kv_len], v_buf[:, :, :kv_len]
    slots = torch.arange(kv_len, device=q.device)
    mask = slots <= input_pos[..., None]  # (S, kv_len) or (B, S, kv_len), True = attend
    if mask.dim() == 3:
        mask = mask[:, None]  # (B, 1, S, kv_len): one mask per row, shared by its heads
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def attention_map(q, keys, input_pos):
    """Softmax attention probabilities (..., S, kv_len) of one head, as eager attention computes
    them: scores scaled by 1/sqrt(D), masked past each query's position, float32 softmax.
    q (..., S, D), keys (..., kv_len, D), input_pos (..., S): one row, or a batch of rows."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    masked = torch.arange(keys.shape[-2], device=q.device) > input_pos[..., None]
    scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def make_flash_attention() -> Callable | None:
    """flash-attn's KV-cache kernel wrapped to our layout, or None when it is not usable."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None

    def flash_attention(q, k_buf, v_buf, input_pos, kv_len: int):
        # flash-attn wants (B, S, H, D); our cache is (B, H, T, D), so pass transposed views.
        # The new k/v are already in the cache; cache_seqlens = last position + 1 (device tensor).
        B = q.shape[0]
        last = input_pos[..., -1] + 1  # one length for all rows, or (B,) per row
        seqlens = last.to(torch.int32).expand(B).contiguous()
        out = flash_attn_with_kvcache(
            q.transpose(1, 2),
            k_buf[:, :, :kv_len].transpose(1, 2),
            v_buf[:, :, :kv_len].transpose(1, 2),
            cache_seqlens=seqlens,
            causal=True,
        )
        return out.transpose(1, 2)

    return flash_attention


class FastLlama:
    """`forward(x, input_pos, cache, kv_len)` for one HF LlamaModel; returns final-norm hidden."""

    def __init__(self, llama, attention: Callable = sdpa_attention, max_positions: int = 0):
        """max_positions: build the RoPE tables for this many positions now (T3: every position
        its learned embeddings can reach), so they never change under a captured graph."""
        cfg = llama.config
        self.llama = llama
        self.layers = list(llama.layers[: cfg.num_hidden_layers])
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attention = attention
        self.cos = self.sin = None
        self.spies: dict[int, int] = {}  # layer -> head whose attention map forward() keeps
        self.spied: dict[int, torch.Tensor] = {}  # layer -> (S, kv_len) probabilities, batch row 0
        self.spy_rows = False  # True: keep every row's map, (B, S, kv_len) (the batch engine)
        self.kernels = None  # KernelTable (CPU), set by the runner after measuring
        self.on_rope_change: Callable | None = None  # called when the tables are rebuilt (graphs read them)
        if max_positions:
            self.ensure_positions(max_positions)

    plain = staticmethod(linear)  # the original's kernel for any product of this backbone

    def linear(self, module, x):
        """`module(x)` for an nn.Linear: through the runner's kernel table (CPU), if it made one."""
        return project(self.kernels, module, x, linear)

    def linears(self) -> list:
        """The nn.Linear modules a decode step multiplies by, layer by layer."""
        return [m for layer in self.layers for m in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]

    def spy_heads(self, heads) -> None:
        """Keep the attention probabilities of these (layer, head) pairs, batch row 0, in
        `self.spied` after each forward: what eager attention with `output_attentions=True`
        would return for them, without running the other heads or layers eagerly."""
        self.spies = {layer: head for layer, head in heads}
        self.spied = {}

    @property
    def dtype(self):
        return self.llama.norm.weight.dtype

    @property
    def device(self):
        return self.llama.norm.weight.device

    def ensure_positions(self, max_len: int) -> None:
        """RoPE tables for positions 0..max_len-1. Rebuilding them frees the old ones, which a
        captured graph may still read: `on_rope_change` (the runner's graph invalidation) runs."""
        if self.cos is None or self.cos.shape[0] < max_len:
            rebuilt = self.cos is not None
            self.cos, self.sin = rope_table(self.llama, max_len, self.device, self.dtype)
            if rebuilt and self.on_rope_change is not None:
                self.on_rope_change()

    def new_cache(self, batch: int, max_len: int, lazy: bool = False) -> StaticKVCache:
        self.ensure_positions(max_len)
        return StaticKVCache(
            len(self.layers), batch, self.n_kv_heads, max_len, self.head_dim, self.dtype, self.device, lazy
        )

    def forward(self, x, input_pos, cache: StaticKVCache, kv_len: int):
        """x (B, S, C) embeddings at positions input_pos -> hidden (B, S, C). input_pos is (S,),
        shared by every row, or (B, S): each row at its own positions (the batch engine's slots)."""
        if input_pos.dim() == 1:
            cos, sin = self.cos[input_pos][None, None], self.sin[input_pos][None, None]  # (1, 1, S, D)
        else:
            cos, sin = self.cos[input_pos][:, None], self.sin[input_pos][:, None]  # (B, 1, S, D)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, layer.input_layernorm(x), input_pos, cos, sin, cache, kv_len)
            x = x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))
        return self.llama.norm(x)

    def _attention(self, i, layer, h, input_pos, cos, sin, cache, kv_len):
        attn = layer.self_attn
        B, S, _ = h.shape
        q = self.linear(attn.q_proj, h).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.linear(attn.k_proj, h).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.linear(attn.v_proj, h).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_buf, v_buf = cache.update(i, input_pos, k, v)
        if self.n_kv_heads != self.n_heads:  # GQA: not used by chatterbox's configs, kept correct
            rep = self.n_heads // self.n_kv_heads
            k_buf, v_buf = k_buf.repeat_interleave(rep, 1), v_buf.repeat_interleave(rep, 1)
        out = self.attention(q, k_buf, v_buf, input_pos, kv_len)  # (B, H, S, D)
        if i in self.spies:
            head = self.spies[i]
            if self.spy_rows:
                self.spied[i] = attention_map(q[:, head], k_buf[:, head, :kv_len], input_pos)
            else:
                self.spied[i] = attention_map(q[0, head], k_buf[0, head, :kv_len], input_pos)
        return self.linear(attn.o_proj, out.transpose(1, 2).reshape(B, S, -1))

    def _mlp(self, mlp, h):
        return self.linear(mlp.down_proj, mlp.act_fn(self.linear(mlp.gate_proj, h)) * self.linear(mlp.up_proj, h))

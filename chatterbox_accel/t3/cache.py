"""A static KV cache: preallocated buffers written in place at device-tensor positions.

Shapes never change while decoding, which is what lets a decode step be compiled or captured
in a CUDA graph. The cache is allocated once per (batch, length, dtype, device) and reused
across `generate()` calls; it only grows when a longer request arrives.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers, batch, n_heads, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_heads, max_len, head_dim)  # (L, B, H, T, D)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, S, D) at positions `input_pos` (S,); return the layer's buffers."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf.index_copy_(2, input_pos, k)
        v_buf.index_copy_(2, input_pos, v)
        return k_buf, v_buf

    def fits(self, batch, max_len, dtype, device) -> bool:
        return (
            self.batch == batch
            and self.max_len >= max_len
            and self.k.dtype == dtype
            and self.k.device == torch.device(device)
        )

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

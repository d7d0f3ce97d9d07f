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
        """Write k, v (B, H, S, D) at positions `input_pos`: (S,) for every row, or (B, 1), one
        decode position per row (the batch engine's slots). Returns the layer's buffers."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        if input_pos.dim() == 1:
            k_buf.index_copy_(2, input_pos, k)
            v_buf.index_copy_(2, input_pos, v)
        else:
            rows, pos = torch.arange(k.shape[0], device=k.device), input_pos[:, 0]
            k_buf[rows, :, pos] = k[:, :, 0]  # (B, H, D) written at each row's own slot
            v_buf[rows, :, pos] = v[:, :, 0]
        return k_buf, v_buf

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """A view of batch rows [start, stop): writes through it land in this cache (the batch
        engine prefills one request into its slot this way)."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.batch, view.max_len = stop - start, self.max_len
        return view

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

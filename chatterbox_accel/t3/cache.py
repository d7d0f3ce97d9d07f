"""A static KV cache: preallocated buffers written in place at device-tensor positions.

Shapes never change while decoding, which is what lets a decode step be compiled or captured
in a CUDA graph. The cache is allocated once per (batch, length, dtype, device) and reused
across `generate()` calls; it only grows when a longer request arrives.

A `lazy` cache is not zeroed when allocated: sized for 8 requests of 1000 new tokens it is ~5 GB,
and on a CPU the first touch of each page is what costs (8.6 s of a 21 s batch, measured on a
2-core EPYC), while short utterances use a tenth of it. Attention multiplies masked positions
by zero, which must not meet NaN garbage, so positions are zeroed (for every row) up to the
furthest a forward will read, before it reads them: `ensure(kv_len)`, called by the decoder
outside the (possibly captured) step.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, n_layers, batch, n_heads, max_len, head_dim, dtype, device, lazy: bool = False):
        shape = (n_layers, batch, n_heads, max_len, head_dim)  # (L, B, H, T, D)
        new = torch.empty if lazy else torch.zeros
        self.k = new(shape, dtype=dtype, device=device)
        self.v = new(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len
        self.base = self  # the cache whose buffers these are (a rows() view's owner)
        self.ready = 0 if lazy else max_len  # positions [0, ready) are finite in every row

    @torch.inference_mode()  # the buffers are inference tensors (allocated by the decoder)
    def ensure(self, upto: int) -> None:
        """Positions [0, upto) hold finite values in every row (zeroing any not yet touched)."""
        base = self.base
        upto = min(int(upto), base.max_len)
        if upto > base.ready:
            base.k[:, :, :, base.ready : upto].zero_()
            base.v[:, :, :, base.ready : upto].zero_()
            base.ready = upto

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, S, D) at positions `input_pos`: (S,) for every row, or (B, S), each
        row at its own positions (the batch engine's slots). Returns the layer's buffers."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        if input_pos.dim() == 1:
            k_buf.index_copy_(2, input_pos, k)
            v_buf.index_copy_(2, input_pos, v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1) against (B, S)
            k_buf[rows, :, input_pos] = k.transpose(1, 2)  # (B, S, H, D) at each row's own slots
            v_buf[rows, :, input_pos] = v.transpose(1, 2)
        return k_buf, v_buf

    def rows(self, start: int, stop: int, step: int = 1) -> "StaticKVCache":
        """A view of batch rows start, start + step, ... < stop: writes through it land in this
        cache (the batch engine prefills requests into their slots' rows this way)."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.k, view.v = self.k[:, start:stop:step], self.v[:, start:stop:step]
        view.batch, view.max_len = view.k.shape[1], self.max_len
        view.base = self.base
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

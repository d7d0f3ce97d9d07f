"""The flash-attn wrapper's use of flash_attn_with_kvcache, checked on CPU against SDPA.

flash-attn needs a GPU; here a fake module implements the documented semantics of
`flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, causal)` ((B, S, H, D) layouts,
the first cache_seqlens[b] cache rows valid, queries aligned to the end of the valid keys), so
the wrapper's transposes, lengths and masking are tested against our SDPA path.
"""
import sys
import types

import torch

from chatterbox_accel.t3.model import make_flash_attention, sdpa_attention


def fake_flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, causal):
    B, S, H, D = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        n = int(cache_seqlens[b])
        k, v = k_cache[b, :n].transpose(0, 1), v_cache[b, :n].transpose(0, 1)  # (H, n, D)
        qb = q[b].transpose(0, 1)  # (H, S, D)
        allowed = torch.arange(n)[None, :] <= (n - S + torch.arange(S))[:, None] if causal else None
        out[b] = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=allowed).transpose(0, 1)
    return out


def test_flash_wrapper_matches_sdpa(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_with_kvcache=fake_flash_attn_with_kvcache))
    flash = make_flash_attention()
    assert flash is not None
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 32, 16
    k_buf, v_buf = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    for positions in (torch.arange(0, 7), torch.tensor([11])):  # a prefill, then a decode step
        q = torch.randn(B, H, positions.numel(), D)
        kv_len = 16
        expected = sdpa_attention(q, k_buf, v_buf, positions, kv_len)
        got = flash(q, k_buf, v_buf, positions, kv_len)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_no_flash_attn_means_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    assert make_flash_attention() is None

"""S3Gen over many utterances at once, each with its own voice and length.

Upstream's `CausalMaskedDiffWithXvec.inference` (chatterbox 0.1.7) takes B rows with per-row
token lengths but one prompt (tokens, mel, x-vector) repeated over them, and draws the CFM
noise for the whole padded batch from the global RNG. `flow_mels` is the same computation with
those limits removed:
- row b is `concat(prompt_token_b, tokens_b)`, padded to the longest, with its own length; the
  encoder runs on the padded batch under its pad mask (as upstream batches);
- conditions carry each row's own prompt mel in its first frames, the x-vector is per row, and
  the CFM mask covers each row's own frames (CFG runs at 2B rows in upstream's `solve_euler`,
  so the S3Gen fast modes' patches of it and of the estimator apply);
- each row's noise is given (drawn from that row's generator, as upstream draws it for one
  utterance), padded frames get zeros and are masked;
- each row's mel is cut after its own prompt and at its own length.
HiFT (`vocode`) runs per row: its source draws random numbers (SineGen) over the whole
signal, so each row is vocoded alone under its own seed, which is what keeps a row's audio
independent of its batch-mates; the flow, where the time goes, is the batched part.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def on_device(ref: dict, device, dtype) -> dict:
    """A reference dict with its tensors on `device` (floating ones in `dtype`)."""
    out = {}
    for k, v in ref.items():
        v = torch.from_numpy(v) if isinstance(v, np.ndarray) else v
        if torch.is_tensor(v):
            v = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


def row_noise(ref: dict, n_tokens: int, ratio: int, meanflow: bool, generator, device, dtype):
    """A row's CFM noise (1, 80, prompt frames + ratio * n_tokens), drawn in the order upstream's
    `S3Gen.inference` draws it for one utterance (meanflow: the noised mels first, then the
    full-length noise whose tail they replace), from `generator` (None: the global RNG)."""
    frames = ref["prompt_feat"].shape[1] + ratio * n_tokens
    if meanflow:
        noised = torch.randn(1, 80, ratio * n_tokens, generator=generator, device=device, dtype=dtype)
        z = torch.randn(1, 80, frames, generator=generator, device=device, dtype=dtype)
        z[..., frames - noised.shape[2]:] = noised
        return z
    return torch.randn(1, 80, frames, generator=generator, device=device, dtype=dtype)


@torch.inference_mode()
def flow_mels(flow, tokens: list, refs: list, noises: list, n_timesteps: int, meanflow: bool,
              finalize: bool | list = True) -> list:
    """Mels (1, 80, frames_b) for rows of speech tokens (1-D), each with its reference dict
    (on the flow's device) and noise (`row_noise`). `finalize` (one bool for all rows, or one
    per row): True, as `S3Gen.inference`; False (the streamer's chunks before the last) leaves
    out the row's last tokens' frames, whose encoder lookahead is not complete yet, as
    upstream's `finalize=False`: its frames end earlier, under its own mask."""
    from chatterbox.models.s3gen.utils.mask import make_pad_mask

    finals = [finalize] * len(tokens) if isinstance(finalize, bool) else [bool(f) for f in finalize]
    if len(finals) != len(tokens):
        raise ValueError(f"finalize has {len(finals)} values for {len(tokens)} rows")
    seqs = [torch.cat([ref["prompt_token"].reshape(-1), t.reshape(-1).to(ref["prompt_token"].device)])
            for t, ref in zip(tokens, refs)]
    lens = torch.tensor([s.numel() for s in seqs], device=seqs[0].device)
    token = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    embedding = torch.cat([torch.atleast_2d(ref["embedding"]) for ref in refs])
    embedding = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))  # (B, 80)
    mask = (~make_pad_mask(lens)).unsqueeze(-1).to(embedding)
    h, h_masks = encode(flow.encoder, flow.input_embedding(token.long()) * mask, lens)
    h_lengths = h_masks.sum(dim=-1).squeeze(dim=-1)
    if not all(finals):  # a row not finalized ends `cut` frames earlier; the batch is cut to the longest
        cut = flow.pre_lookahead_len * flow.token_mel_ratio
        h_lengths = h_lengths - cut * torch.tensor([not f for f in finals], device=h_lengths.device,
                                                   dtype=h_lengths.dtype)
        h = h[:, : int(h_lengths.max())]
    h = flow.encoder_proj(h)
    B, T = h.shape[:2]
    prompt_frames = [ref["prompt_feat"].shape[1] for ref in refs]
    conds = torch.zeros(B, T, flow.output_size, device=h.device, dtype=h.dtype)
    z = torch.zeros(B, 80, T, device=h.device, dtype=h.dtype)
    for b, (ref, noise) in enumerate(zip(refs, noises)):
        conds[b, : prompt_frames[b]] = ref["prompt_feat"][0]
        n = min(int(h_lengths[b]), noise.shape[2])
        z[b, :, :n] = noise[0, :, :n]
    mask = (~make_pad_mask(h_lengths, T)).unsqueeze(1).to(h)
    cfm = flow.decoder
    t_span = torch.linspace(0, 1, n_timesteps + 1, device=h.device, dtype=h.dtype)
    mu = h.transpose(1, 2).contiguous()
    if meanflow:  # CausalConditionalCFM.basic_euler, without its print and progress bar
        est = cfm.estimator
        x, cond = z.to(est.dtype), conds.transpose(1, 2).to(est.dtype)
        mu, mask_e, spks, t_span = mu.to(est.dtype), mask.to(est.dtype), embedding.to(est.dtype), t_span.to(est.dtype)
        for t, r in zip(t_span[:-1], t_span[1:]):
            t, r = t[None].expand(B), r[None].expand(B)
            x = x + (r - t)[:, None, None] * est.forward(x, mask=mask_e, mu=mu, t=t, spks=spks, cond=cond, r=r)
        feat = x.to(z.dtype)
    else:
        if cfm.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        feat = cfm.solve_euler(z, t_span=t_span, mu=mu, mask=mask, spks=embedding, cond=conds.transpose(1, 2))
    return [feat[b : b + 1, :, prompt_frames[b] : int(h_lengths[b])] for b in range(B)]


def encode(encoder, xs, xs_lens):
    """`UpsampleConformerEncoder.forward` (chatterbox 0.1.7, decoding: full chunks) with padded
    rows made exact: the input projection adds its bias at padded positions, and the
    pre-lookahead convolution reads the next 3 positions, so a shorter row's last tokens would
    see the projected padding where, alone, they see zeros (and, through attention, every frame
    would shift). Padded positions are zeroed before that convolution; nothing else differs."""
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask, make_pad_mask

    masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)  # (B, 1, T)
    if encoder.global_cmvn is not None:
        xs = encoder.global_cmvn(xs)
    xs, pos_emb, masks = encoder.embed(xs, masks)
    chunk_masks = add_optional_chunk_mask(xs, masks, encoder.use_dynamic_chunk, encoder.use_dynamic_left_chunk,
                                          0, encoder.static_chunk_size, -1)
    xs = encoder.pre_lookahead_layer(xs * masks.transpose(1, 2).to(xs.dtype))
    xs = encoder.forward_layers(xs, chunk_masks, pos_emb, masks)
    xs, xs_lens = encoder.up_layer(xs.transpose(1, 2).contiguous(), xs_lens)
    xs = xs.transpose(1, 2).contiguous()
    masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)
    xs, pos_emb, masks = encoder.up_embed(xs, masks)
    chunk_masks = add_optional_chunk_mask(xs, masks, encoder.use_dynamic_chunk, encoder.use_dynamic_left_chunk,
                                          0, encoder.static_chunk_size * encoder.up_layer.stride, -1)
    xs = encoder.forward_up_layers(xs, chunk_masks, pos_emb, masks)
    if encoder.normalize_before:
        xs = encoder.after_norm(xs)
    return xs, masks


@torch.inference_mode()
def vocode(s3gen, mel: torch.Tensor, generator=None) -> torch.Tensor:
    """HiFT on one row's mel, then upstream's trim fade: (1, samples), as `S3Gen.inference`.
    With a generator, HiFT's own random draws come from a seed taken from it (the global RNG
    is left as it was); without one, from the global RNG as upstream."""
    def run():
        wav, _ = s3gen.hift_inference(mel.to(dtype=s3gen.dtype), None)
        wav[:, : len(s3gen.trim_fade)] *= s3gen.trim_fade
        return wav

    if generator is None:
        return run()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [mel.device] if mel.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return run()

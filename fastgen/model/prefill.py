"""Prefill: run a decoder over several positions at once and fill the self-attention cache of some rows with them.

Used for what comes before a request's first decode step: an audio or codes prompt (and a long-form window's kept
frames), and a melody decoder's conditioning prefix (fastgen.model.melody). Positions ``start`` … ``start + P − 1``
of the given rows are computed causally: each attends to the rows' cache before ``start`` (written by an earlier
prefill: a melody slot's prefix) and to the positions before it in this call. Logits are not needed: the decode
step after them predicts the next token. Always on the torch path (SDPA), eagerly, outside any captured graph."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_positions(decoder, cache, rows: torch.Tensor, hidden: torch.Tensor, start: int,
                      text_length: torch.Tensor | None) -> None:
    """``hidden`` [n, P, D]: the input embeddings of positions start..start+P-1 of cache ``rows`` [n], without the
    positional sinusoid (added here). ``text_length`` [n]: each row's text tokens for the cross-attention (None for
    a decoder without it)."""
    c = decoder.config
    n, length = hidden.shape[0], hidden.shape[1]
    heads, head_dim, d = c.num_heads, c.head_dim, c.hidden_size
    end = start + length
    if end > decoder.sinusoid.shape[0]:  # the engine reserves its slots' positions up front (reserve_positions)
        raise RuntimeError(f"prefill up to position {end} is past the decoder's {decoder.sinusoid.shape[0]} positions")
    hidden = hidden + decoder.sinusoid[start:end]
    eps = decoder.norm_eps
    # queries at start + i see keys 0 … start + i (the cache before ``start`` holds what came earlier)
    causal = None if start == 0 else (torch.arange(end, device=rows.device).view(1, -1)
                                      <= start + torch.arange(length, device=rows.device).view(-1, 1))
    text_mask = None
    if decoder.cross_attention:
        text_span = int(text_length.max()) if n else 0
        text_mask = (torch.arange(max(text_span, 1), device=rows.device).view(1, -1)
                     < text_length.view(-1, 1)).view(n, 1, 1, -1)
    for i, layer in enumerate(decoder.layers):
        x = F.layer_norm(hidden, (d,), *layer.self_norm, eps)
        q, k, v = layer.qkv(x).view(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        cache.self_k[i, rows, :, start:end] = k
        cache.self_v[i, rows, :, start:end] = v
        if causal is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=decoder.scale)
        else:
            keys, values = cache.self_k[i, rows, :, :end], cache.self_v[i, rows, :, :end]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal, scale=decoder.scale)
        hidden = layer.self_out.add_to(hidden, attn.transpose(1, 2).reshape(n, length, d))

        if layer.cross_q is not None:
            x = F.layer_norm(hidden, (d,), *layer.cross_norm, eps)
            q = layer.cross_q(x).view(n, length, heads, head_dim).transpose(1, 2)
            keys = cache.cross_k[i, rows, :, :text_mask.shape[-1]]
            values = cache.cross_v[i, rows, :, :text_mask.shape[-1]]
            scores = (q.float() @ keys.float().transpose(-1, -2)) * decoder.scale
            weights = scores.masked_fill(~text_mask, -float("inf")).softmax(-1).nan_to_num(0.0)
            attn = (weights @ values.float()).to(hidden.dtype)
            hidden = layer.cross_out.add_to(hidden, attn.transpose(1, 2).reshape(n, length, d))

        x = F.layer_norm(hidden, (d,), *layer.ffn_norm, eps)
        hidden = layer.fc2.add_to(hidden, decoder.activation(layer.fc1(x)))

"""All decoder layers of an eager CPU decode step in one operator call (``cpu_decoder_layers.cpp``).

With every projection on fastgen's GEMV (fastgen.kernels.cpu_gemv) and the attention on fastgen.kernels.cpu_attention,
what is left of an eager step outside those kernels is Python: per layer about 13 operator calls (three LayerNorms,
six GEMVs, two attentions, the activation, the K/V index_put and the views between them), ~300 a musicgen-small
step, each a few microseconds of dispatch, plus the index_put's own indexing. This operator runs the same kernels in
the same order from C++, and writes the new K/V by one memcpy per (row, head), so its result is bitwise that of the
eager layers (tests/test_cpu_decoder_layers.py). Under torch.compile the step is left to inductor, which fuses the
glue itself.

Floor: that of its GEMVs and attentions (see their modules)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._cpu_extension import build, instruction_set_missing
from .cpu_attention import cpu_attention_ref
from .cpu_gemv import cpu_gemv_ref

ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")  # the decoder's activation names, as config.json spells them
LINEARS_PER_LAYER = 6  # qkv, self_out, cross_q, cross_out, fc1, fc2
NORMS_PER_LAYER = 6    # (weight, bias) of the self-attention, cross-attention and FFN LayerNorms


def unavailable_reason(dtype: torch.dtype) -> str | None:
    """None when the operator runs here for a ``dtype`` hidden state and cache (building it if needed)."""
    return instruction_set_missing(dtype) or build()


def cpu_decoder_layers(hidden, norms, packed, scales, self_k, self_v, cross_k, cross_v, rows, position, kv_span,
                       self_bias, text_span, cross_bias, scale: float, eps: float, activation: str) -> torch.Tensor:
    """hidden [R, D] through every layer → [R, D]; each layer's new K/V written into self_k / self_v [layers, rows,
    H, positions, Dh] at (rows, position). ``norms``: 6 tensors a layer (self, cross, FFN LayerNorm weight and
    bias); ``packed``: 6 GEMV weights a layer (qkv, self_out, cross_q, cross_out, fc1, fc2) in cpu_gemv's layout,
    ``scales`` their int8 scales or None. The caller has checked ``unavailable_reason`` once."""
    return torch.ops.fastgen_cpu.decoder_layers(hidden, norms, packed, scales, self_k, self_v, cross_k, cross_v,
                                                rows, position, kv_span, self_bias, text_span, cross_bias, scale,
                                                eps, activation)


_REF_ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
                    "silu": F.silu}


def cpu_decoder_layers_ref(hidden, norms, weights, scales, self_k, self_v, cross_k, cross_v, rows, position,
                           kv_span, self_bias, text_span, cross_bias, scale: float, eps: float,
                           activation: str) -> torch.Tensor:
    """As ``cpu_decoder_layers`` with plain [N, K] weights (int8 codes with their scales), each projection and
    attention by its module's PyTorch reference (fp32 accumulation, rounded to hidden's dtype between them)."""
    num_rows, width = hidden.shape
    heads, head_dim = self_k.shape[2], self_k.shape[4]
    act = _REF_ACTIVATIONS[activation]
    for layer in range(self_k.shape[0]):
        w, n = weights[layer * 6:layer * 6 + 6], norms[layer * 6:layer * 6 + 6]
        s = scales[layer * 6:layer * 6 + 6]
        qkv = cpu_gemv_ref(F.layer_norm(hidden, (width,), n[0], n[1], eps), w[0], scale=s[0])
        q, k, v = qkv.view(num_rows, 3, heads, head_dim).unbind(1)
        self_k[layer, rows, :, position] = k
        self_v[layer, rows, :, position] = v
        attn = cpu_attention_ref(q, self_k[layer], self_v[layer], rows, kv_span, self_bias, scale)
        hidden = cpu_gemv_ref(attn.reshape(num_rows, width), w[1], hidden, s[1])
        q = cpu_gemv_ref(F.layer_norm(hidden, (width,), n[2], n[3], eps), w[2], scale=s[2])
        attn = cpu_attention_ref(q.view(num_rows, heads, head_dim), cross_k[layer], cross_v[layer], rows,
                                 text_span, cross_bias, scale)
        hidden = cpu_gemv_ref(attn.reshape(num_rows, width), w[3], hidden, s[3])
        inner = act(cpu_gemv_ref(F.layer_norm(hidden, (width,), n[4], n[5], eps), w[4], scale=s[4]))
        hidden = cpu_gemv_ref(inner, w[5], hidden, s[5])
    return hidden

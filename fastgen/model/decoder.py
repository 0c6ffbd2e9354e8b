"""MusicGen's decoder as fastgen runs it: weights in fused layouts, a decode step over a static KV cache, and a
prefill for audio prompts. The layer math matches transformers' MusicgenDecoder (pre-LayerNorm blocks: self-attention,
cross-attention over the text, feed-forward; no biases in attention or FFN; K summed embeddings in, K heads out).

A MusicGen-Melody decoder (``melody`` given) is the same without cross-attention: its chroma and text come in as a
prefix of the self-attention sequence (fastgen.model.melody), prefilled like an audio prompt; every other part of the
engine runs it unchanged, with the slot's positions offset by the prefix's length."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastgen.config import MAX_STEPS_PER_CALL, DecoderConfig, MelodyConfig
from fastgen.errors import CheckpointError
from fastgen.model.cpu_paths import build_linears
from fastgen.model.linear import QUANTIZED_PATHS, DenseLinear, GemvLinear, Int8Linear, Linear
from fastgen.model.ops import Ops, StepContext
from fastgen.model.prefill import prefill_positions
from fastgen.model.projections import LINEAR_BACKENDS, FusedProjections, TorchProjections
from fastgen.model.quantize import FUSED_KERNEL_QUANTIZATIONS, validate_quantization

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which transformers' MusicGen uses

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """transformers' MusicgenSinusoidalPositionalEmbedding (tensor2tensor order: cos half, then sin half)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.int64).float().unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


@dataclass
class LayerWeights:
    self_norm: tuple[torch.Tensor, torch.Tensor]
    qkv: Linear                # [3D, D]: q, k, v projections stacked
    self_out: Linear           # [D, D]: hidden = self_out.add_to(hidden, attn)
    cross_norm: tuple[torch.Tensor, torch.Tensor] | None  # the cross-attention's four: None in a melody decoder
    cross_q: Linear | None     # [D, D]
    cross_kv: torch.Tensor | None  # [2D, D]: applied once per request to the text states (never quantised)
    cross_out: Linear | None   # [D, D]
    ffn_norm: tuple[torch.Tensor, torch.Tensor]
    fc1: Linear                # [F, D]
    fc2: Linear                # [D, F]

    def linears(self) -> tuple[Linear, ...]:
        return tuple(linear for linear in (self.qkv, self.self_out, self.cross_q, self.cross_out, self.fc1, self.fc2)
                     if linear is not None)

    def norms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [norm for norm in (self.self_norm, self.cross_norm, self.ffn_norm) if norm is not None]


@dataclass
class KVCache:
    """Static per-layer caches. Rows: cond row of slot s is s, its uncond row is num_slots + s."""
    self_k: torch.Tensor   # [layers, 2·slots, H, max_positions, Dh]
    self_v: torch.Tensor
    cross_k: torch.Tensor  # [layers, 2·slots, H, max_text_tokens, Dh]
    cross_v: torch.Tensor

    def __post_init__(self) -> None:
        # per-layer views, made once: indexing the stacked tensor in the step would cost an operator call each time
        self.self_k_layers = list(self.self_k.unbind(0))
        self.self_v_layers = list(self.self_v.unbind(0))
        self.cross_k_layers = list(self.cross_k.unbind(0))
        self.cross_v_layers = list(self.cross_v.unbind(0))

    @classmethod
    def allocate(cls, config: DecoderConfig, num_slots: int, max_positions: int, max_text_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> "KVCache":
        # zeros, not empty: the torch path multiplies masked-out cache entries by 0, which must not meet NaN bits
        def make(length: int) -> torch.Tensor:
            return torch.zeros(config.num_layers, 2 * num_slots, config.num_heads, length, config.head_dim,
                               dtype=dtype, device=device)
        return cls(make(max_positions), make(max_positions), make(max_text_tokens), make(max_text_tokens))

    @staticmethod
    def bytes_per_slot(config: DecoderConfig, max_positions: int, max_text_tokens: int, dtype: torch.dtype) -> int:
        per_position = 2 * 2 * config.num_layers * config.hidden_size * torch.tensor([], dtype=dtype).element_size()
        return per_position * (max_positions + max_text_tokens)

    def clear_rows(self, rows: torch.Tensor) -> None:
        for cache in (self.self_k, self.self_v, self.cross_k, self.cross_v):
            cache[:, rows] = 0


Projections = TorchProjections | FusedProjections


class MusicgenDecoder:
    """Holds the decoder weights (one device, one dtype) and runs its forward passes."""

    def __init__(self, config: DecoderConfig, weights: dict[str, torch.Tensor], *, text_hidden_size: int,
                 device: torch.device, dtype: torch.dtype, quantization: str | None = None,
                 melody: MelodyConfig | None = None) -> None:
        self.config = config
        self.melody = melody
        self.cross_attention = melody is None  # a melody decoder conditions through a prefix instead
        self.device, self.dtype = device, dtype
        self.quantization = validate_quantization(quantization)
        self.activation = ACTIVATIONS[config.activation]
        self.scale = config.head_dim ** -0.5
        self.norm_eps = LAYER_NORM_EPS
        w = _WeightReader(weights, device, dtype)
        prefix = "decoder.model.decoder."
        c = config
        self.embed = torch.stack([w.take(f"{prefix}embed_tokens.{k}.weight", (c.vocab_size + 1, c.hidden_size))
                                  for k in range(c.num_codebooks)])
        w.skip(f"{prefix}embed_positions.weights")  # older exports carry the sinusoid table; we recompute it
        # rows past the trained range feed only the discarded overrun steps of multi-step calls
        self.sinusoid = sinusoidal_table(c.max_position_embeddings + MAX_STEPS_PER_CALL, c.hidden_size).to(
            device=device, dtype=dtype)
        d, f = c.hidden_size, c.ffn_dim
        layer = [f"{prefix}layers.{i}." for i in range(c.num_layers)]

        def raw(key: str, shape: tuple[int, ...]):  # a loader of the checkpoint's float weight (build_linears casts)
            return lambda: w.take(key, shape, dtype=torch.float32)

        def stacked(keys: list[str], shape: tuple[int, int]):  # q, k, v (or the LM heads) as one [n·N, K] weight
            def load() -> torch.Tensor:
                parts = [w.take(key, shape, dtype=torch.float32) for key in keys]
                if any(part.is_meta for part in parts):
                    return torch.empty(len(keys) * shape[0], shape[1], device="meta")
                return torch.cat(parts)
            return load

        def build(loaders) -> list[Linear]:
            return build_linears(loaders, device=device, dtype=dtype, quantization=self.quantization)
        # one role (shape) at a time: a CPU picks each role's fastest path by measurement (fastgen.model.linear)
        cross = self.cross_attention
        roles = {
            "qkv": build([stacked([f"{p}self_attn.{n}_proj.weight" for n in "qkv"], (d, d)) for p in layer]),
            "self_out": build([raw(f"{p}self_attn.out_proj.weight", (d, d)) for p in layer]),
            "cross_q": build([raw(f"{p}encoder_attn.q_proj.weight", (d, d)) for p in layer]) if cross else None,
            "cross_out": build([raw(f"{p}encoder_attn.out_proj.weight", (d, d)) for p in layer]) if cross else None,
            "fc1": build([raw(f"{p}fc1.weight", (f, d)) for p in layer]),
            "fc2": build([raw(f"{p}fc2.weight", (d, f)) for p in layer]),
        }
        self.layers: list[LayerWeights] = []
        for i, p in enumerate(layer):
            norm = lambda name: (w.take(f"{p}{name}.weight", (d,)), w.take(f"{p}{name}.bias", (d,)))  # noqa: E731
            self.layers.append(LayerWeights(
                self_norm=norm("self_attn_layer_norm"), cross_norm=norm("encoder_attn_layer_norm") if cross else None,
                ffn_norm=norm("final_layer_norm"),
                cross_kv=torch.cat([w.take(f"{p}encoder_attn.{n}_proj.weight", (d, d)) for n in "kv"])
                if cross else None,
                **{role: built[i] if built is not None else None for role, built in roles.items()}))
        self.final_norm = (w.take(f"{prefix}layer_norm.weight", (d,)), w.take(f"{prefix}layer_norm.bias", (d,)))
        heads = [stacked([f"decoder.lm_heads.{k}.weight" for k in range(c.num_codebooks)], (c.vocab_size, d))]
        # Logits leave the head in fp32: guidance 3 scales their rounding by 3, and bf16 logits near 10 are only
        # good to ±0.03. On CUDA cuBLAS writes fp32 straight from bf16/fp16 inputs; elsewhere the head is kept in
        # fp32 (a few percent of the decoder's bytes). int8 heads are dequantised as they are: their deviation is
        # documented with the rest of int8's.
        self.head_writes_fp32 = (dtype != torch.float32 and self.quantization is None
                                 and _mm_out_dtype_works(device, dtype))
        head_dtype = dtype if self.head_writes_fp32 or self.quantization is not None else torch.float32
        self.lm_heads = build_linears(heads, device=device, dtype=head_dtype, quantization=self.quantization)[0]
        self.text_proj: tuple[torch.Tensor, torch.Tensor] | None = None
        if text_hidden_size != d:
            self.text_proj = (w.take("enc_to_dec_proj.weight", (d, text_hidden_size)),
                              w.take("enc_to_dec_proj.bias", (d,)))
        self.chroma_proj: tuple[torch.Tensor, torch.Tensor] | None = None  # as transformers: only when widths differ
        if melody is not None and melody.num_chroma != d:
            self.chroma_proj = (w.take("audio_enc_to_dec_proj.weight", (d, melody.num_chroma)),
                                w.take("audio_enc_to_dec_proj.bias", (d,)))
        w.finish()
        # an eager CPU step runs its layers in one C++ call where it can (_cpu_layers); False runs them one operator
        # at a time (the same result, bitwise: for tests and benchmarks)
        self.cpu_layers_op = True
        self._cpu_layers_args: tuple | None | bool = False  # False: not worked out yet
        self.projections: Projections = TorchProjections(self.activation, self.final_norm, self.head_logits,
                                                         LAYER_NORM_EPS)

    @property
    def linear_backend(self) -> str:
        return self.projections.name

    def set_linear_backend(self, backend: str) -> None:
        """How decode runs the projections (fastgen.model.projections): "torch", or "triton" (the fused,
        batch-invariant kernels, on plain weights: a packed CPU layout goes back to [N, K]). Prefill is unaffected."""
        if backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
        self._cpu_layers_args = False
        if backend == "torch":
            self.projections = TorchProjections(self.activation, self.final_norm, self.head_logits, LAYER_NORM_EPS)
            return
        if self.quantization not in FUSED_KERNEL_QUANTIZATIONS:
            raise ValueError(f"linear_backend='triton' runs weight-only int8, not quantization={self.quantization!r}")
        self.use_stock_linears()
        heads = self.lm_heads
        if isinstance(heads, DenseLinear) and heads.weight.dtype != self.dtype:
            # kept in fp32 for the torch path where no GEMM writes fp32 from 16-bit inputs; the kernel does
            heads = DenseLinear(heads.weight.to(self.dtype))
        self.projections = FusedProjections(self.config.activation, self.activation, self.final_norm, heads,
                                            LAYER_NORM_EPS)

    def reserve_fused_scratch(self, rows: int) -> None:
        """Size the fused kernels' split-K scratch for steps of up to ``rows`` rows (on the triton linear backend,
        before graph capture)."""
        from fastgen.kernels.fused_linear import reserve_fused_linear_scratch
        linears = [linear for layer in self.layers for linear in layer.linears()] + [self.projections.lm_heads]
        weights = [_weight_of(linear) for linear in linears]
        reserve_fused_linear_scratch(rows, sorted({(w.shape[0], w.shape[1], w.dtype) for w in weights}, key=str),
                                     self.device)

    def linears(self) -> list[Linear]:
        """Every projection a decode step streams (the LM heads included)."""
        return [linear for layer in self.layers for linear in layer.linears()] + [self.lm_heads]

    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: the projections and LM heads at their stored width, plus the
        layer norms (the embedding reads only the few rows of the step's tokens)."""
        norms = [t for layer in self.layers for pair in layer.norms() for t in pair] + list(self.final_norm)
        return sum(linear.nbytes for linear in self.linears()) + sum(t.numel() * t.element_size() for t in norms)

    def use_stock_linears(self) -> None:
        """Back to F.linear / addmm on plain weights wherever a packed layout was chosen (the fused Triton kernels
        read [N, K] weights)."""
        for layer in self.layers:
            for role in ("qkv", "self_out", "cross_q", "cross_out", "fc1", "fc2"):
                if getattr(layer, role) is not None:
                    setattr(layer, role, getattr(layer, role).dense())
        self.lm_heads = self.lm_heads.dense()
        self._cpu_layers_args = False

    def prefix_positions(self, max_text_tokens: int) -> int:
        """Self-attention positions a slot reserves in front of its audio for the conditioning prefix: a melody
        decoder's chroma and text (fastgen.model.melody), none for cross-attention."""
        if self.melody is None:
            return 0
        return self.melody.chroma_length + max_text_tokens

    def reserve_positions(self, positions: int) -> None:
        """Make the sinusoid table cover ``positions`` (before any step is compiled or captured: they read it). A
        melody prefix puts audio past the checkpoint's max_position_embeddings; transformers grows its table so too,
        and a row's values do not depend on the table's length."""
        if positions > self.sinusoid.shape[0]:
            self.sinusoid = sinusoidal_table(positions, self.config.hidden_size).to(self.sinusoid)

    # ------------------------------------------------------------------------------------------------------------
    def project_chroma(self, chroma: torch.Tensor) -> torch.Tensor:
        """One-hot chroma [..., F, num_chroma] → decoder width (audio_enc_to_dec_proj)."""
        states = chroma.to(self.dtype)
        return F.linear(states, *self.chroma_proj) if self.chroma_proj is not None else states

    def project_text(self, text_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """T5 states [n, T, Dt] → decoder width, zeroed at padding (transformers multiplies by the mask)."""
        states = text_states.to(self.dtype)
        if self.text_proj is not None:
            states = F.linear(states, *self.text_proj)
        return states * mask.to(states.dtype).unsqueeze(-1)

    def write_cross_kv(self, cache: KVCache, rows: torch.Tensor, states: torch.Tensor) -> None:
        """Cross-attention K/V of text states [n, T, D] into cache rows [n] (computed once per request)."""
        n, length, _ = states.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim
        for i, layer in enumerate(self.layers):
            kv = F.linear(states, layer.cross_kv).view(n, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
            cache.cross_k[i, rows, :, :length] = kv[0]
            cache.cross_v[i, rows, :, :length] = kv[1]

    def decode(self, ops: Ops, hidden: torch.Tensor, cache: KVCache, ctx: StepContext) -> torch.Tensor:
        """One decode step for R rows. hidden [R, D] (embedded inputs); ctx: the rows' cache rows, positions and
        text lengths (``ops.begin_step`` or ``ops.context``). Returns logits [R, K, V]. No host syncs, static
        shapes. On the triton linear backend the residual adds write into ``hidden`` in place (it is the step's own
        buffer)."""
        num_rows = hidden.shape[0]
        c = self.config
        heads, head_dim, d = c.num_heads, c.head_dim, c.hidden_size
        p = self.projections
        layers_args = self._cpu_layers(ops, hidden, cache)
        if layers_args is not None:  # the same layers as below, in one C++ call (bitwise equal)
            hidden = torch.ops.fastgen_cpu.decoder_layers(
                hidden, *layers_args, cache.self_k, cache.self_v, cache.cross_k, cache.cross_v, ctx.rows,
                ctx.position, ctx.kv_span, ctx.self_bias, ctx.text_span, ctx.cross_bias, self.scale, LAYER_NORM_EPS,
                c.activation)
            return p.logits(hidden).view(num_rows, c.num_codebooks, c.vocab_size)
        for i, layer in enumerate(self.layers):
            q, k, v = p.normed(layer.qkv, hidden, layer.self_norm).view(num_rows, 3, heads, head_dim).unbind(1)
            attn = ops.self_attention(ctx, cache.self_k_layers[i], cache.self_v_layers[i], q, k, v, self.scale)
            hidden = p.add_to(layer.self_out, hidden, attn.reshape(num_rows, d))

            if layer.cross_q is not None:  # (a melody decoder has none)
                q = p.normed(layer.cross_q, hidden, layer.cross_norm).view(num_rows, heads, head_dim)
                attn = ops.cross_attention(ctx, cache.cross_k_layers[i], cache.cross_v_layers[i], q, self.scale)
                hidden = p.add_to(layer.cross_out, hidden, attn.reshape(num_rows, d))

            hidden = p.add_to(layer.fc2, hidden, p.normed_activated(layer.fc1, hidden, layer.ffn_norm))
        return p.logits(hidden).view(num_rows, c.num_codebooks, c.vocab_size)

    def _cpu_layers(self, ops: Ops, hidden: torch.Tensor, cache: KVCache) -> tuple | None:
        """The weights of fastgen.kernels.cpu_decoder_layers (norms, packed, scales), when an eager CPU step can run
        all its layers through it: the torch projections with every one on fastgen's GEMV (bf16, fp32 or int8
        codes), the CPU attention kernel, and the cache in the hidden state's dtype. None otherwise; under
        torch.compile inductor fuses the layers' glue itself."""
        if not self.cpu_layers_op or torch.compiler.is_compiling() or not getattr(ops, "cpu_attention", False):
            return None
        if cache.self_k.dtype != hidden.dtype or hidden.device.type != "cpu" or hidden.dim() != 2:
            return None
        if self._cpu_layers_args is False:
            self._cpu_layers_args = self._cpu_layers_weights()
        return self._cpu_layers_args

    def _cpu_layers_weights(self) -> tuple | None:
        from fastgen.kernels import cpu_decoder_layers as kernel
        if not self.cross_attention:  # the operator runs each layer's cross-attention: a melody decoder goes op by op
            return None
        linears = [linear for layer in self.layers for linear in layer.linears()]
        on_gemv = all(isinstance(linear, GemvLinear) or (isinstance(linear, Int8Linear) and linear.kernel == "gemv")
                      for linear in linears)
        if (not isinstance(self.projections, TorchProjections) or not on_gemv
                or self.config.activation not in kernel.ACTIVATIONS or kernel.unavailable_reason(self.dtype)):
            return None
        norms = [t for layer in self.layers for pair in (layer.self_norm, layer.cross_norm, layer.ffn_norm)
                 for t in pair]
        scales = [linear.scale if isinstance(linear, Int8Linear) else None for linear in linears]
        return norms, [linear.packed for linear in linears], scales

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM heads of all codebooks: hidden [R, D] → fp32 logits [R, K·V]."""
        if self.head_writes_fp32:
            return torch.mm(hidden, self.lm_heads.weight.t(), out_dtype=torch.float32)
        if self.lm_heads.path in QUANTIZED_PATHS:
            return self.lm_heads(hidden).float()
        return self.lm_heads(hidden.float())

    def prefill(self, cache: KVCache, rows: torch.Tensor, tokens: torch.Tensor, text_length: torch.Tensor,
                start: int = 0) -> None:
        """Fill the self-attention cache of ``rows`` [n] with delayed prompt tokens [K, P] at positions
        start..start+P-1 (all rows see the same tokens: a request's cond and uncond rows; ``start``: a melody slot's
        prefix comes first). Logits are not needed: the decode step after them predicts the first new token."""
        codebook = torch.arange(self.config.num_codebooks, device=tokens.device).view(-1, 1)
        embedded = self.embed[codebook, tokens].sum(0)  # [P, D]
        hidden = embedded.unsqueeze(0).expand(rows.shape[0], *embedded.shape)
        prefill_positions(self, cache, rows, hidden, start, text_length)

    def prefill_prefix(self, cache: KVCache, rows: torch.Tensor, states: torch.Tensor) -> None:
        """A melody decoder's conditioning prefix: states [n, L, D] (fastgen.model.melody) into positions 0..L-1 of
        ``rows``."""
        prefill_positions(self, cache, rows, states.to(self.dtype), 0, None)


def _weight_of(linear: Linear) -> torch.Tensor:
    """The [N, K] tensor the fused kernel reads: the plain weight, or the int8 codes."""
    return linear.q if isinstance(linear, Int8Linear) else linear.weight


def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=torch.float32) runs for ``dtype`` inputs here (CUDA, torch ≥ 2.8)."""
    if device.type != "cuda":
        return False
    try:
        probe = torch.ones(2, 8, device=device, dtype=dtype)
        return torch.mm(probe, probe.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class _WeightReader:
    """Takes named tensors out of a checkpoint dict (removing them, so the file's copy is freed as soon as fastgen
    holds its own), checking shapes; reports missing and unexpected keys."""

    def __init__(self, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.weights = weights
        self.device, self.dtype = device, dtype

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight on the decoder's device in ``dtype`` (default: the decoder's)."""
        tensor = self.weights.pop(key, None)
        if tensor is None:  # at once: a placeholder would meet torch.cat with real tensors before finish()
            raise CheckpointError(f"decoder weight {key} is missing from the checkpoint")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"weight {key} has shape {tuple(tensor.shape)}, expected {shape} from config.json")
        return tensor.to(device=self.device, dtype=dtype or self.dtype)

    def skip(self, key: str) -> None:
        self.weights.pop(key, None)

    def finish(self) -> None:
        owned = ("decoder.", "enc_to_dec_proj.", "audio_enc_to_dec_proj.")
        unexpected = [k for k in self.weights if k.startswith(owned)]
        if unexpected:
            shown = ", ".join(unexpected[:5]) + (" …" if len(unexpected) > 5 else "")
            raise CheckpointError(f"{len(unexpected)} unexpected decoder weight(s) in the checkpoint: {shown}")

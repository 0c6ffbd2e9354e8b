"""The sampler of a CPU decode step as one operator (``cpu_sampling.cpp``): classifier-free guidance, temperature,
top-k, top-p, the counter-hash Gumbel draw, the delay pattern and the position advance.

Its reference is kernels/sampling_ref.py's ``sample_next_tokens_ref`` followed by the step's position advance
(``cpu_sample_next_tokens_ref``): spelled in aten, ~90 operator calls a step, most of them the counter hash over
every (row, codebook, token), each with its dispatch and many with a parallel region. The operator does the same
work per (row, codebook), computing the noise only for the tokens top-k / top-p keep and nothing at all for a
codebook whose frame is padding or prompt. Greedy tokens, guidance, the temperature, the top-k threshold and the
uniforms are bitwise the reference's; the top-p probabilities (exp) and the Gumbel noise (log) come from the C
library where aten uses its vectorised functions, which may differ in the last bit: a token whose top-p mass sits
within ~1e-7 of top_p, or two perturbed scores within an ulp, may go the other way (tests/test_cpu_sampling.py
counts them; the law is the same, checked against exact probabilities). Every row is computed on its own, so its
tokens do not depend on the thread count or its batch-mates.

Floor: reads 2·B·K·V float32 logits, writes B·K tokens and codes."""
from __future__ import annotations

import torch

from ._cpu_extension import build
from .sampling_ref import advance_positions_ref, sample_next_tokens_ref


def unavailable_reason() -> str | None:
    """None when the operator runs here (building the CPU kernels if needed). It is scalar C++: any x86-64 CPU."""
    return build()


def cpu_sample_next_tokens(logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames,
                           prompt_frames, tokens, codes, nonfinite, pad_id: int, audio_channels: int,
                           dummy_slot: int) -> None:
    """Sample the batch's next tokens into tokens / codes / nonfinite and advance position (see the reference)."""
    torch.ops.fastgen_cpu.sample_next_tokens(logits, slots, guidance_scale, temperature, top_k, top_p, seed, position,
                                             num_frames, prompt_frames, tokens, codes, nonfinite, pad_id,
                                             audio_channels, dummy_slot)


def cpu_sample_next_tokens_ref(logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames,
                               prompt_frames, tokens, codes, nonfinite, pad_id: int, audio_channels: int,
                               dummy_slot: int) -> None:
    """sample_next_tokens_ref, then the step's position advance (advance_positions_ref), as the torch backend."""
    sample_next_tokens_ref(logits, slots, guidance_scale, temperature, top_k, top_p, seed, position, num_frames,
                           prompt_frames, tokens, codes, nonfinite, pad_id, audio_channels)
    advance_positions_ref(position, slots, dummy_slot)

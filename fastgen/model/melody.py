"""MusicGen-Melody's conditioning prefix, as transformers' MusicgenMelodyForConditionalGeneration builds it.

The melody decoder has no cross-attention. At its first step transformers puts [projected chroma; projected text] in
front of the input embeddings, so they are the first positions of the self-attention sequence:

- chroma: the melody's one-hot chroma [F, num_chroma] → audio_enc_to_dec_proj → fitted to ``chroma_length`` frames:
  tiled when shorter (ceil(chroma_length / F) copies), then cut. Without a melody: the null chroma, one frame one-hot
  at bin 0, tiled.
- text: T5 → enc_to_dec_proj → × attention mask. fastgen encodes each prompt alone, so a request's text is its own T
  tokens (a padded transformers batch would put the shorter prompts' padding in their prefix: the decoder uses no
  attention mask). An unconditional request (prompt None) gets the text of MusicgenMelodyProcessor's
  get_unconditional_inputs: T5's tokens of "" with the mask zeroed, so T0 zero rows (T0 = 1: T5's </s>).
- the prefix has positions 0 … L − 1 (L = chroma_length + T) with the sinusoid added like any position; the first
  audio token sits at L. A causal decoder attends within the prefix causally, so a prefill of it is exact.
- guidance's unconditional row: the null chroma (projected and tiled: a projected one-hot, not zeros) and T zero rows
  of text; the same length L, so both rows of a slot step at the same positions.

Long-form windows keep the prefix (the same melody and text) in front of each window's kept frames."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgen.config import MelodyConfig


def null_chroma(num_chroma: int) -> torch.Tensor:
    """The chroma of no melody: one frame, one-hot at bin 0 [1, num_chroma]."""
    chroma = torch.zeros(1, num_chroma)
    chroma[0, 0] = 1.0
    return chroma


def fit_chroma(states: torch.Tensor, length: int) -> torch.Tensor:
    """Projected chroma [F, D] → [length, D]: tiled ceil(length / F) times when shorter, then cut (transformers'
    rule, applied after the projection as there)."""
    if states.shape[0] < length:
        states = states.repeat(math.ceil(length / states.shape[0]), 1)
    return states[:length]


@dataclass(frozen=True)
class MelodyPrefix:
    """The prefix rule of one melody checkpoint."""
    config: MelodyConfig
    null_text_tokens: int  # T0: the text of an unconditional request (the tokens of "")

    def __post_init__(self) -> None:
        if self.null_text_tokens < 1:
            raise ValueError(f"null_text_tokens must be ≥ 1, got {self.null_text_tokens}")

    def length(self, text_tokens: int | None) -> int:
        """L: the prefix's positions for a prompt of ``text_tokens`` tokens (None: unconditional)."""
        return self.config.chroma_length + (self.null_text_tokens if text_tokens is None else text_tokens)

    @torch.inference_mode()
    def states(self, decoder, chroma: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        """The prefix of a request's two rows, [2, L, D] in the decoder's dtype: row 0 conditioned (``chroma``
        [F, num_chroma] one-hot, None: the null chroma; ``text`` [T, D] projected and masked, None: unconditional),
        row 1 guidance's unconditional row."""
        device = decoder.device
        null = fit_chroma(decoder.project_chroma(null_chroma(self.config.num_chroma).to(device)),
                          self.config.chroma_length)
        cond = null if chroma is None else fit_chroma(decoder.project_chroma(chroma.to(device)),
                                                      self.config.chroma_length)
        if text is None:
            text = torch.zeros(self.null_text_tokens, null.shape[1], dtype=null.dtype, device=device)
        text = text.to(device=device, dtype=null.dtype)
        return torch.stack([torch.cat([cond, text]), torch.cat([null, torch.zeros_like(text)])])

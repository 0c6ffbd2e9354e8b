"""The chroma of a melody, as transformers' MusicgenMelodyFeatureExtractor computes it, on torch.stft.

The extractor builds its spectrogram with torchaudio, which cannot be installed beside torch 2.13, so fastgen computes
the same features itself (tests/test_melody_chroma.py checks them equal to the extractor's, run with a stand-in for
torchaudio's Spectrogram): the waveform in float32, channels averaged, cut to ``chunk_length`` seconds; shorter than
``n_fft`` it is zero-padded on both sides; a centred, reflect-padded STFT with a periodic Hann window of ``n_fft``
samples and hop ``hop_length``; power |X|² / Σw² (torchaudio's ``normalized=True``); the 12-bin chroma filter bank
(transformers.audio_utils.chroma_filter_bank, tuning 0) summed over frequency; each frame divided by its largest bin
(eps 1e-6); then one-hot at the argmax (a silent frame: bin 0).

Two differences from the extractor, both documented: audio at another rate is resampled with fastgen's resampler
(soxr, fastgen.audio.resample), not torchaudio's sinc filter, so the chroma of such audio may differ in a frame
whose two strongest bins are nearly tied; and audiocraft's Demucs stem separation (drums and bass removed before the
chroma) is not done, as transformers does not do it either: separate stems first for audiocraft's behaviour."""
from __future__ import annotations

import functools
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastgen.audio import prepare_audio_prompt
from fastgen.errors import CheckpointError

PREPROCESSOR_CONFIG = "preprocessor_config.json"
NORM_EPS = 1e-6  # the extractor's normalize(p=inf, eps=1e-6)
# a melody is cut to chunk_length seconds before the chroma; at its own rate it is cut a little later, so that the
# resampler's filter sees the same samples around the cut as when the whole melody is resampled
RESAMPLE_MARGIN_S = 0.25
_LIMITS = {"sampling_rate": (1_000, 768_000), "n_fft": (16, 1 << 18), "hop_length": (1, 1 << 18),
           "chunk_length": (1, 3600), "num_chroma": (1, 128)}


@dataclass(frozen=True)
class ChromaSettings:
    """The feature extractor's settings (a melody checkpoint's preprocessor_config.json; defaults:
    facebook/musicgen-melody's)."""
    sampling_rate: int = 32_000
    n_fft: int = 16_384
    hop_length: int = 4_096
    chunk_length: int = 30  # seconds: a longer melody is cut
    num_chroma: int = 12

    def __post_init__(self) -> None:
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
                raise CheckpointError(f"{PREPROCESSOR_CONFIG}: {name} must be an integer in [{low}, {high}], "
                                      f"got {value!r}")

    @classmethod
    def from_folder(cls, folder: Path) -> "ChromaSettings":
        """From the checkpoint's preprocessor_config.json; the defaults where it is missing or leaves a field out."""
        path = folder / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls(**{name: raw[name] for name in _LIMITS if name in raw})

    @property
    def max_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    def frames(self, samples: int) -> int:
        """Chroma frames of ``samples`` samples at ``sampling_rate`` (after the cut and the padding to n_fft)."""
        return 1 + max(min(samples, self.max_samples), self.n_fft) // self.hop_length


@functools.lru_cache(maxsize=4)
def _filters(sampling_rate: int, n_fft: int, num_chroma: int) -> torch.Tensor:
    from transformers.audio_utils import chroma_filter_bank
    bank = chroma_filter_bank(sampling_rate=sampling_rate, num_frequency_bins=n_fft, tuning=0, num_chroma=num_chroma)
    return torch.from_numpy(bank).float()


@torch.inference_mode()
def chroma_features(mono: torch.Tensor, settings: ChromaSettings) -> torch.Tensor:
    """float32 mono samples [samples] at ``settings.sampling_rate`` → one-hot chroma float32 [frames, num_chroma]."""
    n_fft = settings.n_fft
    waveform = mono.to(torch.float32)[:settings.max_samples].reshape(1, -1)
    if waveform.shape[-1] < n_fft:  # centred zero padding, the odd sample on the right
        pad = n_fft - waveform.shape[-1]
        waveform = F.pad(waveform, (pad // 2, pad // 2 + pad % 2), "constant", 0.0)
    window = torch.hann_window(n_fft)  # periodic, as torchaudio's default window_fn
    spectrum = torch.stft(waveform, n_fft=n_fft, hop_length=settings.hop_length, win_length=n_fft, window=window,
                          center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    spectrum = spectrum / window.pow(2.0).sum().sqrt()  # torchaudio's window normalisation (normalized=True)
    power = spectrum.abs().pow(2)  # [1, n_fft / 2 + 1, frames]
    filters = _filters(settings.sampling_rate, n_fft, settings.num_chroma)
    raw = torch.einsum("cf,...ft->...ct", filters, power)
    normalised = F.normalize(raw, p=float("inf"), dim=-2, eps=NORM_EPS).transpose(1, 2)  # [1, frames, chroma]
    strongest = normalised.argmax(-1, keepdim=True)
    return torch.zeros_like(normalised).scatter_(-1, strongest, 1.0)[0]


def melody_chroma(waveform: Any, sample_rate: int, settings: ChromaSettings, name: str = "melody") -> torch.Tensor:
    """A user's melody (numpy or torch, [samples] or [channels ≤ 2, samples], any rate; integer PCM scaled) → its
    one-hot chroma [frames, num_chroma]. Bad audio raises ValueError naming ``name``, as an audio prompt does."""
    if isinstance(waveform, (np.ndarray, torch.Tensor)) and waveform.ndim in (1, 2) and \
            isinstance(sample_rate, numbers.Integral) and not isinstance(sample_rate, bool) and sample_rate > 0:
        # only the first chunk_length seconds count: cut before converting and resampling the rest
        keep = settings.chunk_length * int(sample_rate) + int(RESAMPLE_MARGIN_S * sample_rate)
        waveform = waveform[..., :keep]
    audio = prepare_audio_prompt(waveform, sample_rate, target_sample_rate=settings.sampling_rate, channels=1,
                                 name=name)
    return chroma_features(torch.from_numpy(audio[0]), settings)

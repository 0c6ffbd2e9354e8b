"""fastgen's chroma (fastgen.model.chroma, on torch.stft) equals transformers' MusicgenMelodyFeatureExtractor's, run
with a stand-in for torchaudio.transforms.Spectrogram (torchaudio cannot be installed beside torch 2.13) that computes
what torchaudio's does: torch.stft, window normalisation, |X|^power."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from fastgen.errors import CheckpointError
from fastgen.model.chroma import ChromaSettings, chroma_features, melody_chroma

RATE = 32_000


class StandInSpectrogram(torch.nn.Module):
    """torchaudio.transforms.Spectrogram's computation (torchaudio.functional.spectrogram, pad 0, onesided)."""

    def __init__(self, n_fft=400, win_length=None, hop_length=None, pad=0, window_fn=torch.hann_window, power=2.0,
                 normalized=False, center=True, pad_mode="reflect", onesided=True, **_):
        super().__init__()
        assert pad == 0 and onesided
        self.n_fft, self.win_length = n_fft, win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.window, self.power, self.normalized = window_fn(self.win_length), power, normalized
        self.center, self.pad_mode = center, pad_mode

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        shape = waveform.size()
        spec = torch.stft(waveform.reshape(-1, shape[-1]), n_fft=self.n_fft, hop_length=self.hop_length,
                          win_length=self.win_length, window=self.window, center=self.center, pad_mode=self.pad_mode,
                          normalized=False, onesided=True, return_complex=True)
        spec = spec.reshape(shape[:-1] + spec.shape[-2:])
        if self.normalized:  # normalized=True is torchaudio's "window" normalisation
            spec /= self.window.pow(2.0).sum().sqrt()
        return spec.abs().pow(self.power)


@pytest.fixture(scope="module")
def extractor():
    import transformers.models.musicgen_melody.feature_extraction_musicgen_melody as module
    stand_in = types.SimpleNamespace(transforms=types.SimpleNamespace(Spectrogram=StandInSpectrogram))
    saved = getattr(module, "torchaudio", None)
    module.torchaudio = stand_in
    try:
        yield module.MusicgenMelodyFeatureExtractor()
    finally:
        if saved is None:
            del module.torchaudio
        else:
            module.torchaudio = saved


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(int(3.3 * RATE)) / RATE
    chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0))
    return {
        "tones and noise": (0.2 * chord + 0.05 * rng.standard_normal(t.shape)).astype(np.float32),
        "stereo": (0.3 * rng.standard_normal((2, 2 * RATE))).astype(np.float32),
        "shorter than n_fft": (0.3 * rng.standard_normal(5001)).astype(np.float32),
        "silence": np.zeros(40_000, np.float32),
        "longer than 30 s": (0.3 * rng.standard_normal(31 * RATE + 123)).astype(np.float32),
    }


@pytest.mark.parametrize("name", list(signals()))
def test_chroma_equals_the_feature_extractor(extractor, name):
    wave = signals()[name]
    expected = extractor([wave], sampling_rate=RATE, return_tensors="pt")["input_features"][0]
    ours = melody_chroma(wave, RATE, ChromaSettings())
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours, expected)
    assert torch.equal(ours.sum(-1), torch.ones(ours.shape[0]))  # one-hot
    assert ours.shape[0] == ChromaSettings().frames(wave.shape[-1])


def test_silence_is_bin_zero_and_integer_pcm_is_scaled():
    silent = chroma_features(torch.zeros(20_000), ChromaSettings())
    assert torch.equal(silent.argmax(-1), torch.zeros(5, dtype=torch.long))
    wave = signals()["tones and noise"]
    pcm = np.round(wave * 32767).astype(np.int16)
    np.testing.assert_array_equal(melody_chroma(pcm, RATE, ChromaSettings()),
                                  melody_chroma(pcm.astype(np.float32) / 32768, RATE, ChromaSettings()))


def test_other_rates_are_resampled_to_32_khz():
    """A melody at 48 kHz gives (almost) the chroma of the same melody at 32 kHz: soxr, not torchaudio's filter."""
    def tone(rate: int) -> np.ndarray:
        t = np.arange(3 * rate) / rate
        return (0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.3 * np.sin(2 * np.pi * 587.3 * t)).astype(np.float32)
    at_48k = melody_chroma(tone(48_000), 48_000, ChromaSettings())
    at_32k = melody_chroma(tone(RATE), RATE, ChromaSettings())
    assert at_48k.shape == at_32k.shape
    assert (at_48k.argmax(-1) == at_32k.argmax(-1)).float().mean() > 0.9


def test_settings_from_preprocessor_config(tmp_path):
    assert ChromaSettings.from_folder(tmp_path) == ChromaSettings()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"n_fft": 4096, "hop_length": 1024,
                                                                   "feature_size": 12}))
    assert ChromaSettings.from_folder(tmp_path) == ChromaSettings(n_fft=4096, hop_length=1024)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"hop_length": 0}))
    with pytest.raises(CheckpointError, match="hop_length"):
        ChromaSettings.from_folder(tmp_path)

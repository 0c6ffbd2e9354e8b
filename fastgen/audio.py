"""Audio I/O and audio-prompt preparation.

All waveforms here are float32 numpy arrays shaped ``[channels, samples]``
(channels first, like the codec's tensors).

Files go through ``soundfile`` (libsndfile): it is maintained, reads and writes
WAV/FLAC/OGG with exact integer-PCM scaling, and has no dependency on torch or
ffmpeg. Resampling uses ``soxr``, a high-quality band-limited resampler that is
much faster than FFT or polyphase filtering in numpy/scipy for arbitrary ratios.

Both are the optional ``audio`` extra and are imported only where a file is read
or written or a waveform is resampled: generating codes and audio arrays needs
neither (GPU machines often lack libsndfile).
"""

from __future__ import annotations

import importlib
import numbers
import pathlib
import re
import unicodedata
from typing import Any

import numpy as np
import torch

__all__ = ["check_can_write", "prepare_audio_prompt", "read_audio", "resample", "safe_filename", "write_audio"]

# Subtypes stored as floats keep values outside [-1, 1]; every other one would wrap or saturate.
_FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
_DEFAULT_SUBTYPE = "PCM_16"
# Integer PCM dtypes are scaled to [-1, 1] by their full-scale value, as soundfile does when reading.
_PCM_FULL_SCALE = {np.dtype(np.int8): 2**7, np.dtype(np.int16): 2**15, np.dtype(np.int32): 2**31}


# ---------------------------------------------------------------------------
# Optional packages
# ---------------------------------------------------------------------------


def _optional(module: str, needed_for: str) -> Any:
    """Imports ``module`` (from the ``audio`` extra) or raises one line that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModuleNotFoundError(f"{needed_for} needs the {module} package: pip install {module} "
                                  f"(or, in a fastgen checkout, pip install -e '.[audio]')", name=module) from error
    except OSError as error:  # soundfile is installed but libsndfile is not
        raise ModuleNotFoundError(f"{needed_for} needs the {module} package with its native library "
                                  f"({error}): pip install --force-reinstall {module}", name=module) from error


def _soundfile() -> Any:
    return _optional("soundfile", "reading or writing audio files")


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _file_format(path: pathlib.Path) -> str:
    extension = path.suffix.lstrip(".").upper()
    formats = _soundfile().available_formats()
    if extension not in formats:
        raise ValueError(
            f"cannot tell the audio format of {str(path)!r} from its extension; "
            "use .wav, .flac or .ogg (or another extension libsndfile knows)"
        )
    return extension


def _file_subtype(file_format: str, subtype: str) -> str:
    subtype = subtype.upper()
    soundfile = _soundfile()
    if soundfile.check_format(file_format, subtype):
        return subtype
    # The PCM_16 default cannot go into e.g. OGG; use that format's own default (VORBIS) instead.
    if subtype == _DEFAULT_SUBTYPE:
        return soundfile.default_subtype(file_format)
    allowed = ", ".join(sorted(soundfile.available_subtypes(file_format)))
    raise ValueError(f"subtype {subtype!r} is not supported for {file_format} files; choose one of: {allowed}")


def _check_sample_rate(sample_rate: Any, name: str) -> int:
    # bool is an Integral too, but True is never a meant sample rate.
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise ValueError(f"{name} must be a positive integer number of Hz, got {sample_rate!r}")
    return int(sample_rate)


def write_audio(
    path: str | pathlib.Path, audio: np.ndarray, sample_rate: int, *, subtype: str = _DEFAULT_SUBTYPE
) -> pathlib.Path:
    """Writes ``audio`` (float ``[channels, samples]``) to ``path``; the extension picks the format.

    Integer subtypes (PCM_16, PCM_24, ...) are clipped to [-1, 1] first, since
    out-of-range floats would otherwise wrap around or be saturated
    inconsistently by the encoder. Parent folders are created.
    """
    path = pathlib.Path(path)
    sample_rate = _check_sample_rate(sample_rate, "sample_rate")
    audio = _as_float_array(audio, "audio")
    if audio.ndim == 1:
        audio = audio[np.newaxis]
    if audio.ndim != 2:
        raise ValueError(f"audio must be [channels, samples], got shape {audio.shape}")
    if audio.shape[0] > 2 and audio.shape[0] > audio.shape[1]:
        raise ValueError(
            f"audio has shape {audio.shape}, which looks like [samples, channels]; "
            "pass it channels-first (audio.T)"
        )
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples")
    file_format = _file_format(path)
    subtype = _file_subtype(file_format, subtype)
    if subtype not in _FLOAT_SUBTYPES:
        audio = np.clip(audio, -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # soundfile wants [frames, channels].
    _soundfile().write(path, audio.T, sample_rate, subtype=subtype, format=file_format)
    return path


def check_can_write(extension: str) -> None:
    """Raises now what write_audio would raise for files ending in ``extension`` (".wav", ".flac", ".ogg"): the one-line
    ModuleNotFoundError naming soundfile when it is missing, ValueError for a format libsndfile cannot write. A job
    calls it before generating, since the first file is written only after the first output is done."""
    _file_subtype(_file_format(pathlib.Path(f"check{extension}")), _DEFAULT_SUBTYPE)


def read_audio(path: str | pathlib.Path) -> tuple[np.ndarray, int]:
    """Reads an audio file as float32 ``[channels, samples]`` plus its sample rate."""
    data, sample_rate = _soundfile().read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(sample_rate)


# ---------------------------------------------------------------------------
# Signal processing
# ---------------------------------------------------------------------------


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resamples float32 ``[channels, samples]`` (or 1-D) audio from ``orig_sr`` to ``target_sr`` Hz."""
    orig_sr = _check_sample_rate(orig_sr, "orig_sr")
    target_sr = _check_sample_rate(target_sr, "target_sr")
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr:
        return audio
    soxr = _optional("soxr", f"resampling audio from {orig_sr} Hz to {target_sr} Hz")
    if audio.ndim == 1:
        return soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    # soxr filters each column independently, so channels never mix.
    resampled = soxr.resample(np.ascontiguousarray(audio.T), orig_sr, target_sr, quality="HQ")
    return np.ascontiguousarray(resampled.T, dtype=np.float32)


def _as_float_array(waveform: Any, name: str) -> np.ndarray:
    """Converts numpy / torch / nested sequences to float32, scaling integer PCM to [-1, 1]."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu()
        # numpy has no bfloat16; integer tensors keep their dtype for PCM scaling below.
        waveform = (waveform.float() if waveform.is_floating_point() else waveform).numpy()
    try:
        array = np.asarray(waveform)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise ValueError(f"{name} must be a numeric array, got {type(waveform).__name__}") from error
    if array.dtype in _PCM_FULL_SCALE:
        return (array / _PCM_FULL_SCALE[array.dtype]).astype(np.float32)
    if array.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return ((array.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _to_channels_first(audio: np.ndarray, name: str) -> np.ndarray:
    if audio.ndim == 1:
        return audio[np.newaxis]
    if audio.ndim != 2:
        raise ValueError(f"{name} must be 1-D (mono) or 2-D [channels, samples], got shape {audio.shape}")
    if audio.shape[0] > 2:
        hint = " It looks like [samples, channels]; pass it transposed (waveform.T)." if audio.shape[1] <= 2 else ""
        raise ValueError(
            f"{name} must have 1 or 2 channels (shape [channels, samples]), got shape {audio.shape}.{hint}"
        )
    return audio


def _convert_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    if audio.shape[0] == channels:
        return audio
    if channels == 1:
        return audio.mean(axis=0, keepdims=True)  # stereo -> mono: average, so levels stay in range
    return np.repeat(audio, channels, axis=0)  # mono -> stereo: same signal in both channels


def prepare_audio_prompt(
    waveform: Any,
    sample_rate: int,
    *,
    target_sample_rate: int,
    channels: int,
    name: str = "audio_prompt",
) -> np.ndarray:
    """Validates a user's waveform and returns float32 ``[channels, samples]`` at ``target_sample_rate``.

    ``waveform`` may be numpy or torch, 1-D (mono) or 2-D ``[channels, samples]``
    with 1 or 2 channels; integer PCM dtypes are scaled to [-1, 1]. Errors are
    ``ValueError``s naming ``name`` so callers can surface them unchanged.
    """
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels!r}")
    target_sample_rate = _check_sample_rate(target_sample_rate, "target_sample_rate")
    sample_rate = _check_sample_rate(sample_rate, f"{name} sample rate")
    audio = _to_channels_first(_as_float_array(waveform, name), name)
    if audio.size == 0:
        raise ValueError(f"{name} is empty; it needs at least one sample")
    if not np.isfinite(audio).all():
        raise ValueError(f"{name} contains NaN or infinite samples; all samples must be finite (normally in [-1, 1])")
    # Downmix before resampling (less work), upmix after.
    if channels < audio.shape[0]:
        audio = _convert_channels(audio, channels)
    audio = resample(audio, sample_rate, target_sample_rate)
    audio = _convert_channels(audio, channels)
    return np.ascontiguousarray(audio, dtype=np.float32)


# ---------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------

_MAX_STEM_CHARS = 60


def safe_filename(text: str | None, index: int, *, extension: str = ".wav") -> str:
    """A portable file name for prompt number ``index``, e.g. ``"003_lofi_hip_hop_beat.wav"``.

    The index prefix keeps names unique (two prompts may slug to the same text)
    and never empty; the slug is ASCII letters, digits and ``_`` only, so it is
    valid on every common filesystem.
    """
    if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    # NFKD splits "é" into "e" + accent so the letter survives the ASCII filter.
    ascii_text = unicodedata.normalize("NFKD", text or "").encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:_MAX_STEM_CHARS].rstrip("_")
    stem = f"{index:03d}_{slug or ('unconditional' if text is None else 'audio')}"
    return stem + extension

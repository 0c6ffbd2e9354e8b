"""Audio bytes for HTTP responses: WAV and raw PCM (16-bit little-endian) with the standard library and numpy, so they
work where soundfile is missing (the GPU machines); FLAC through soundfile, imported only when asked for; MP3 and Ogg
Opus (OpenAI's speech formats) through soundfile's libsndfile where it writes them (1.1+), Opus resampled to 48 kHz by
soxr. A streamed WAV starts with an open-ended header (RIFF and data sizes 0xFFFFFFFF, as streaming TTS servers send
it)."""
from __future__ import annotations

import base64
import binascii
import io
import struct
import wave

import numpy as np

from fastgen.errors import RequestError

FORMATS = ("wav", "flac", "pcm")
STREAMABLE = ("wav", "pcm")
SPEECH_FORMATS = ("wav", "flac", "pcm", "mp3", "opus")  # /v1/audio/speech's, where this machine can encode them
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg"}
OPUS_RATE = 48000  # Opus encodes 8, 12, 16, 24 or 48 kHz; MusicGen makes 32 kHz
OPEN_ENDED = 0xFFFFFFFF


def pcm16(audio: np.ndarray) -> bytes:
    """float32 [channels, samples] → interleaved s16le bytes (clipped to [-1, 1])."""
    scaled = np.clip(audio, -1.0, 1.0) * 32767.0
    return np.round(scaled).astype("<i2").T.tobytes()


def wav_header(channels: int, sample_rate: int, data_bytes: int = OPEN_ENDED) -> bytes:
    """A 44-byte PCM16 WAV header; the default sizes say "unknown length" for a stream."""
    riff = OPEN_ENDED if data_bytes == OPEN_ENDED else 36 + data_bytes
    block = channels * 2
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16) +
            b"data" + struct.pack("<I", data_bytes))


def encode_whole(audio: np.ndarray, sample_rate: int, response_format: str) -> bytes:
    if response_format == "pcm":
        return pcm16(audio)
    if response_format == "wav":
        data = pcm16(audio)
        return wav_header(audio.shape[0], sample_rate, len(data)) + data
    if response_format == "flac":
        buffer = io.BytesIO()
        _soundfile().write(buffer, np.ascontiguousarray(audio.T), sample_rate, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()
    if response_format in ("mp3", "opus"):
        soundfile, audio = _soundfile(), np.ascontiguousarray(audio.T)
        if response_format == "opus":
            import soxr
            audio, sample_rate = soxr.resample(audio, sample_rate, OPUS_RATE), OPUS_RATE
        buffer = io.BytesIO()
        container, subtype = ("MP3", "MPEG_LAYER_III") if response_format == "mp3" else ("OGG", "OPUS")
        soundfile.write(buffer, np.clip(audio, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
        return buffer.getvalue()
    raise ValueError(f"unknown response_format {response_format!r}")


def can_encode(response_format: str) -> bool:
    """Whether encode_whole can write ``response_format`` on this machine (wav and pcm always)."""
    if response_format in ("wav", "pcm"):
        return True
    try:
        soundfile = _soundfile()
        if response_format == "flac":
            return True
        if response_format == "mp3":
            return "MPEG_LAYER_III" in soundfile.available_subtypes("MP3")
        if response_format == "opus":
            import soxr  # noqa: F401
            return "OPUS" in soundfile.available_subtypes("OGG")
    except (RequestError, ImportError, OSError):
        pass
    return False


def check_speech_format(response_format: str) -> None:
    """A RequestError naming the formats this machine encodes, unless ``response_format`` is one of them."""
    if response_format in SPEECH_FORMATS and can_encode(response_format):
        return
    supported = [f for f in SPEECH_FORMATS if can_encode(f)]
    reason = ("needs soundfile (and soxr for opus) with a libsndfile that writes it" if response_format in
              SPEECH_FORMATS else "is not supported")
    raise RequestError(f"response_format {response_format!r} {reason}; supported here: {', '.join(supported)}")


def decode_upload(data: bytes, name: str = "audio_prompt") -> tuple[np.ndarray, int]:
    """An uploaded audio prompt → (float32 [channels, samples], sample rate). WAV (PCM 8/16/24/32-bit) needs only the
    standard library; other formats go through soundfile when it is installed."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as reader:
                channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
                frames = reader.readframes(reader.getnframes())
        except (wave.Error, EOFError) as exc:
            if "unknown format" not in str(exc):  # e.g. float WAV: soundfile reads it
                raise RequestError(f"{name}: not a readable WAV file ({exc})") from None
        else:
            return _pcm_to_float(frames, width, channels), rate
    try:
        soundfile = _soundfile()
    except RequestError:
        raise RequestError(f"{name}: only PCM WAV uploads can be read here (soundfile is not installed for "
                           "other formats)") from None
    try:
        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises its own error types for undecodable data
        raise RequestError(f"{name}: not a readable audio file ({exc})") from None
    return np.ascontiguousarray(audio.T), int(rate)


def decode_base64(text: str, name: str = "audio_prompt") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name} must be base64 of an audio file (WAV or FLAC)") from None


def _pcm_to_float(frames: bytes, width: int, channels: int) -> np.ndarray:
    if width == 1:
        values = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        values = np.frombuffer(frames, "<i2").astype(np.float32) / 32768
    elif width == 3:
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3)
        ints = (raw[:, 0].astype(np.int32) | raw[:, 1].astype(np.int32) << 8 | raw[:, 2].astype(np.int32) << 16)
        values = ((ints << 8) >> 8).astype(np.float32) / 2**23
    elif width == 4:
        values = np.frombuffer(frames, "<i4").astype(np.float32) / 2**31
    else:
        raise RequestError(f"audio_prompt: unsupported WAV sample width of {width} bytes")
    return np.ascontiguousarray(values.reshape(-1, channels).T)


def _soundfile():
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the package is there but libsndfile is not
        raise RequestError("response_format 'flac' needs the soundfile package (pip install soundfile); use "
                           "'wav' or 'pcm'") from None
    return soundfile

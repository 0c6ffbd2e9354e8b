"""Audio files, resampling and audio-prompt validation."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from fastgen.audio import prepare_audio_prompt, read_audio, resample, safe_filename, write_audio

RATE = 32_000


def sine(frequency: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    time = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * time)).astype(np.float32)


def dominant_frequency(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[spectrum.argmax()])


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("subtype", "tolerance"), [("PCM_16", 1 / 2**15), ("FLOAT", 0.0)])
def test_wav_round_trip(tmp_path, channels, subtype, tolerance):
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.9, 0.9, (channels, 1000)).astype(np.float32)
    path = write_audio(tmp_path / "nested" / "dir" / "x.wav", audio, RATE, subtype=subtype)
    loaded, rate = read_audio(path)
    assert rate == RATE and loaded.dtype == np.float32 and loaded.shape == audio.shape
    np.testing.assert_allclose(loaded, audio, atol=tolerance, rtol=0)
    assert soundfile.info(path).subtype == subtype


def test_integer_files_are_clipped_float_files_are_not(tmp_path):
    audio = np.array([[-2.0, -0.5, 0.5, 2.0]], dtype=np.float32)
    clipped, _ = read_audio(write_audio(tmp_path / "pcm.wav", audio, RATE))
    np.testing.assert_allclose(clipped[0, [0, 3]], [-1.0, 1.0], atol=1e-4)
    unclipped, _ = read_audio(write_audio(tmp_path / "float.wav", audio, RATE, subtype="FLOAT"))
    np.testing.assert_array_equal(unclipped, audio)


def test_format_follows_extension(tmp_path):
    audio = sine(440, 0.1, RATE)[np.newaxis]
    assert soundfile.info(write_audio(tmp_path / "x.flac", audio, RATE)).format == "FLAC"
    # OGG cannot hold PCM_16, so the default subtype falls back to Vorbis.
    assert soundfile.info(write_audio(tmp_path / "x.ogg", audio, RATE)).subtype == "VORBIS"
    with pytest.raises(ValueError, match="extension"):
        write_audio(tmp_path / "x.mp9", audio, RATE)
    with pytest.raises(ValueError, match="not supported for FLAC"):
        write_audio(tmp_path / "y.flac", audio, RATE, subtype="FLOAT")


def test_write_rejects_bad_audio(tmp_path):
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_audio(tmp_path / "x.wav", np.array([[0.0, np.nan]], dtype=np.float32), RATE)
    with pytest.raises(ValueError, match=r"\[samples, channels\]"):
        write_audio(tmp_path / "x.wav", np.zeros((100, 2), dtype=np.float32), RATE)
    with pytest.raises(ValueError, match="channels, samples"):
        write_audio(tmp_path / "x.wav", np.zeros((1, 2, 3), dtype=np.float32), RATE)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        write_audio(tmp_path / "x.wav", np.zeros((1, 10), dtype=np.float32), 0)


# ---------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("orig_sr", [16_000, 44_100, 48_000])
def test_resample_keeps_length_ratio_and_pitch(orig_sr):
    stereo = np.stack([sine(440, 1.0, orig_sr), sine(1000, 1.0, orig_sr)])
    out = resample(stereo, orig_sr, RATE)
    assert out.dtype == np.float32 and out.shape == (2, RATE)
    # Channels stay apart and keep their pitch.
    assert abs(dominant_frequency(out[0], RATE) - 440) <= 2
    assert abs(dominant_frequency(out[1], RATE) - 1000) <= 2
    assert resample(stereo[0], orig_sr, RATE).shape == (RATE,)


def test_resample_identity():
    audio = sine(440, 0.1, RATE)[np.newaxis]
    np.testing.assert_array_equal(resample(audio, RATE, RATE), audio)


# ---------------------------------------------------------------------------
# Audio prompts
# ---------------------------------------------------------------------------


def prepare(waveform, sample_rate=RATE, channels=1):
    return prepare_audio_prompt(waveform, sample_rate, target_sample_rate=RATE, channels=channels)


def test_prompt_channel_conversion():
    mono = sine(440, 0.1, RATE)
    assert prepare(mono).shape == (1, len(mono))
    stereo = prepare(mono, channels=2)
    np.testing.assert_array_equal(stereo[0], stereo[1])  # mono -> stereo duplicates
    left_right = np.stack([mono, -0.5 * mono])
    np.testing.assert_allclose(prepare(left_right)[0], 0.25 * mono, atol=1e-7)  # stereo -> mono averages
    assert prepare(left_right, channels=2).shape == (2, len(mono))


def test_prompt_accepts_torch_integers_and_resamples():
    tensor = torch.from_numpy(sine(440, 0.5, 16_000)).to(torch.bfloat16)
    out = prepare(tensor, sample_rate=16_000)
    assert out.dtype == np.float32 and out.shape == (1, RATE // 2)
    assert abs(dominant_frequency(out[0], RATE) - 440) <= 4
    pcm = np.array([-32768, 0, 16384], dtype=np.int16)  # integer PCM is scaled to [-1, 1]
    np.testing.assert_allclose(prepare(pcm)[0], [-1.0, 0.0, 0.5])
    assert prepare([0.0, 0.5, -0.5]).shape == (1, 3)


@pytest.mark.parametrize(
    ("waveform", "sample_rate", "message"),
    [
        (np.zeros(0, dtype=np.float32), RATE, "audio_prompt is empty"),
        (np.zeros((2, 0), dtype=np.float32), RATE, "audio_prompt is empty"),
        (np.array([0.0, np.inf]), RATE, "audio_prompt contains NaN or infinite"),
        (np.array([0.0, np.nan]), RATE, "audio_prompt contains NaN or infinite"),
        (np.array(["a", "b"]), RATE, "audio_prompt must hold real numbers"),
        (np.array([1 + 1j]), RATE, "audio_prompt must hold real numbers"),
        ([[0.0, 1.0], [0.5]], RATE, "audio_prompt must be a numeric array"),
        (np.zeros((1000, 2), dtype=np.float32), RATE, r"1 or 2 channels.*transposed \(waveform.T\)"),
        (np.zeros((3, 1000), dtype=np.float32), RATE, r"1 or 2 channels \(shape \[channels, samples\]\)"),
        (np.zeros((1, 2, 3), dtype=np.float32), RATE, "1-D \\(mono\\) or 2-D"),
        (np.zeros(10, dtype=np.float32), 0, "audio_prompt sample rate must be a positive integer"),
        (np.zeros(10, dtype=np.float32), -8000, "audio_prompt sample rate must be a positive integer"),
        (np.zeros(10, dtype=np.float32), 32000.0, "audio_prompt sample rate must be a positive integer"),
        (np.zeros(10, dtype=np.float32), True, "audio_prompt sample rate must be a positive integer"),
    ],
)
def test_prompt_errors_name_the_parameter(waveform, sample_rate, message):
    with pytest.raises(ValueError, match=message):
        prepare(waveform, sample_rate=sample_rate)


def test_prompt_error_uses_given_name():
    with pytest.raises(ValueError, match="audio_prompts\\[2\\] is empty"):
        prepare_audio_prompt(np.zeros(0), RATE, target_sample_rate=RATE, channels=1, name="audio_prompts[2]")


# ---------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------


def test_safe_filename():
    assert safe_filename("Lo-Fi hip hop: chill/beats!", 3) == "003_lo_fi_hip_hop_chill_beats.wav"
    assert safe_filename("Café Müller", 12, extension=".flac") == "012_cafe_muller.flac"
    assert safe_filename("🎸🎸", 0) == "000_audio.wav"
    assert safe_filename(None, 1) == "001_unconditional.wav"
    assert safe_filename("../../etc/passwd", 0) == "000_etc_passwd.wav"
    assert len(safe_filename("x" * 500, 0)) < 80
    with pytest.raises(ValueError, match="index"):
        safe_filename("x", -1)


# ---------------------------------------------------------------------------
# Without the audio extra (a GPU machine without libsndfile)
# ---------------------------------------------------------------------------

_WITHOUT_AUDIO_PACKAGES = r'''
import sys

BLOCKED = ("soundfile", "soxr")

class Blocker:  # what a machine without soundfile and soxr looks like to importers
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
for name in BLOCKED:  # and to availability probes: importlib.util.find_spec answers None, as for a missing package
    sys.modules[name] = None
import numpy as np
import fastgen
from fastgen.audio import resample, write_audio

model = fastgen.MusicGen.from_pretrained(sys.argv[1], device="cpu", max_slots=2, max_duration_s=1.0)
params = fastgen.SamplingParams(max_new_tokens=8, do_sample=False, guidance_scale=3.0)
prompt_audio = (np.zeros((1, 1280), dtype=np.float32), 32000)  # at the model's rate: nothing to resample
outs = model.generate(["a", None], params) + model.generate(["b"], params, audio_prompts=[prompt_audio])
assert all(o.codes.shape[0] == 4 and o.codes.size and np.isfinite(o.audio).all() for o in outs)
for call in (lambda: write_audio(sys.argv[2], outs[0].audio, 32000), lambda: resample(outs[0].audio, 16000, 32000)):
    try:
        call()
    except ModuleNotFoundError as error:
        print("ERROR", error)
assert not [m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None]
print("GENERATED", len(outs))
'''


def test_generates_without_soundfile_and_soxr(tiny_mono_dir, tmp_path):
    import subprocess
    import sys
    target = tmp_path / "out.wav"
    done = subprocess.run([sys.executable, "-c", _WITHOUT_AUDIO_PACKAGES, str(tiny_mono_dir), str(target)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "GENERATED 3" in lines
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 2, lines
    assert "reading or writing audio files needs the soundfile package: pip install soundfile" in errors[0]
    assert "resampling audio from 16000 Hz to 32000 Hz needs the soxr package: pip install soxr" in errors[1]
    assert not target.exists()

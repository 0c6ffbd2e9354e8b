"""The command line with melodies and audiocraft exports: `--melody FILE` gives the Python API's codes; a melody on a
text-only checkpoint is refused before anything loads (exit 2); an audiocraft export runs with --text-encoder /
--audio-encoder and writes the codes of the Hugging Face folder it came from."""
from __future__ import annotations

import hashlib
import json

import pytest
from audiocraft_export import write_export
from melody_reference import MELODY_RATE, melodies

import fastgen
from fastgen.cli import main


def generate(capsys, model, out, *extra: str) -> tuple[int, list[dict], str]:
    code = main(["generate", "--model", str(model), "--out", str(out), "--duration", "0.3", "--device", "cpu",
                 "--max-slots", "2", "--seed", "3", "--json", *extra])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")], captured.err


@pytest.fixture(scope="module")
def tune_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tunes") / "hum.wav"
    fastgen.audio.write_audio(path, melodies()["short"], MELODY_RATE, subtype="FLOAT")
    return path


def test_melody_flag_gives_the_python_api_codes(capsys, tmp_path, tune_file, tiny_melody_mono_dir):
    code, records, err = generate(capsys, tiny_melody_mono_dir, tmp_path / "out", "lofi beat", "--melody",
                                  str(tune_file))
    assert code == 0, err
    (record,) = records
    assert record["melody"] == str(tune_file.resolve())
    model = fastgen.MusicGen.from_pretrained(tiny_melody_mono_dir, max_slots=2)
    expected = model.generate(["lofi beat"], fastgen.SamplingParams(duration=0.3, seed=3),
                              melodies=[fastgen.audio.read_audio(tune_file)])[0]
    assert record["codes_sha256"] == hashlib.sha256(expected.codes.tobytes()).hexdigest()


def test_melody_refusals(capsys, tmp_path, tune_file, tiny_mono_dir):
    code, _, err = generate(capsys, tiny_mono_dir, tmp_path / "out", "lofi beat", "--melody", str(tune_file))
    assert code == 2 and "field 'melody'): this checkpoint is a text-to-music MusicGen" in err
    assert "loading" not in err  # refused before the model loads
    code, _, err = generate(capsys, tiny_mono_dir, tmp_path / "out2", "x", "--melody", str(tmp_path / "none.wav"))
    assert code == 2 and "--melody: no such file" in err
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "x"}\n')
    code, _, err = generate(capsys, tiny_mono_dir, tmp_path / "out3", "--manifest", str(tmp_path / "jobs.jsonl"),
                            "--melody", str(tune_file))
    assert code == 2 and "--melody beside it" in err


def test_audiocraft_export_on_the_command_line(capsys, tmp_path, tiny_stereo_dir):
    export, t5, codec = write_export(tiny_stereo_dir, tmp_path / "export")
    code, ours, err = generate(capsys, export, tmp_path / "out", "lofi beat", "--text-encoder", str(t5),
                               "--audio-encoder", str(codec))
    assert code == 0, err
    code, reference, err = generate(capsys, tiny_stereo_dir, tmp_path / "reference", "lofi beat")
    assert code == 0, err
    assert ours[0]["codes_sha256"] == reference[0]["codes_sha256"]

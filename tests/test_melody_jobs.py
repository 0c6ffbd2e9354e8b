"""Melodies in batch jobs: a manifest's `melody` field (a file relative to the manifest) reaches the engine and gives
the Python API's codes; a melody line is refused before anything loads when the checkpoint is not a melody model, or
the file is missing."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from melody_reference import MELODY_RATE, melodies

import fastgen
from fastgen.batch.job import run_items
from fastgen.batch.manifest import ManifestError, check_limits, items_from_prompts, read_manifest
from fastgen.batch.writer import OutputFolder


@pytest.fixture(scope="module")
def tune_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tunes")
    fastgen.audio.write_audio(folder / "hum.wav", melodies()["short"], MELODY_RATE, subtype="FLOAT")
    return folder / "hum.wav"


def test_manifest_melody_field(tmp_path, tune_file, tiny_melody_mono_dir, tiny_mono_dir):
    manifest = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "lofi beat", "name": "with", "melody": str(tune_file), "duration": 0.3, "seed": 1},
             {"prompt": "lofi beat", "name": "without", "duration": 0.3, "seed": 1}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    items = read_manifest(manifest)
    assert items[0].melody == tune_file and items[1].melody is None
    assert items[0].to_row()["melody"] == str(tune_file.resolve())
    check_limits(items, fastgen.MusicGen.inspect(tiny_melody_mono_dir))
    with pytest.raises(ManifestError, match="line 1 \\(field 'melody'\\): this checkpoint is a text-to-music"):
        check_limits(items, fastgen.MusicGen.inspect(tiny_mono_dir))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "melody": "nowhere.wav"}))
    with pytest.raises(ManifestError, match="field 'melody': no such file"):
        read_manifest(tmp_path / "bad.jsonl")
    assert items_from_prompts(["a", "b"], melody=tune_file)[1].melody == tune_file


def test_job_with_melodies_gives_the_python_api_codes(tmp_path, tune_file, tiny_melody_mono_dir):
    model = fastgen.MusicGen.from_pretrained(tiny_melody_mono_dir, max_slots=2, backend="torch")
    params = fastgen.SamplingParams(duration=0.3, seed=5)
    items = items_from_prompts(["lofi beat", "jazz"], params, melody=tune_file)
    with OutputFolder(tmp_path / "out") as folder:
        result = run_items(model, items, folder, model_name="tiny-melody")
    assert not result.failed and len(result.written) == 2
    assert result.written[0]["melody"] == str(tune_file.resolve())
    tune = fastgen.audio.read_audio(tune_file)
    expected = model.generate(["lofi beat", "jazz"], params, melodies=[tune, tune])
    for record in result.written:
        index = 0 if record["prompt"] == "lofi beat" else 1
        assert record["codes_sha256"] == hashlib.sha256(expected[index].codes.tobytes()).hexdigest()
    np.testing.assert_array_equal(expected[0].codes, model.generate(["lofi beat"], params, melodies=[tune])[0].codes)

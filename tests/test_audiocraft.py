"""audiocraft exports (state_dict.bin + compression_state_dict.bin) load through torch.load(weights_only=True) and
yaml.safe_load only, and give the codes of the Hugging Face folder they came from (mono, stereo, melody); a file that
would need more (a pickled object that runs code) is refused, and its code never runs."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from audiocraft_export import write_export
from melody_reference import MELODY_RATE, melodies

import fastgen
from fastgen.errors import CheckpointError

PROMPTS = ["lofi beat with a slow bass", "jazz piano"]


def greedy(guidance: float = 3.0) -> fastgen.SamplingParams:
    return fastgen.SamplingParams(max_new_tokens=12, do_sample=False, guidance_scale=guidance)


def load(folder, **kw) -> fastgen.MusicGen:
    return fastgen.MusicGen.from_pretrained(folder, max_slots=2, backend="torch", dtype=torch.float32,
                                            max_duration_s=2.0, **kw)


@pytest.mark.parametrize("kind", ["mono", "stereo", "melody"])
def test_export_gives_the_codes_of_its_hugging_face_folder(tmp_path, kind, tiny_mono_dir, tiny_stereo_dir,
                                                           tiny_melody_mono_dir):
    hf_folder = {"mono": tiny_mono_dir, "stereo": tiny_stereo_dir, "melody": tiny_melody_mono_dir}[kind]
    export, t5, codec = write_export(hf_folder, tmp_path)
    ours = load(export, text_encoder=t5, audio_encoder=codec)
    reference = load(hf_folder)
    ours_config, reference_config = ours.engine.model.config, reference.engine.model.config
    # audiocraft's sinusoid has no table: an export gets transformers' converter's 2048 positions
    assert ours_config.decoder.max_position_embeddings == 2048
    assert ours_config == dataclasses.replace(reference_config, decoder=dataclasses.replace(
        reference_config.decoder, max_position_embeddings=2048))
    extra = {}
    if kind == "melody":
        assert ours.engine.model.chroma.chunk_length == 5  # the training segment xp.cfg names
        extra = {"melodies": [(melodies()["short"], MELODY_RATE), None]}
    for guidance in (1.0, 3.0):
        for got, expected in zip(ours.generate(PROMPTS, greedy(guidance), **extra),
                                 reference.generate(PROMPTS, greedy(guidance), **extra)):
            np.testing.assert_array_equal(got.codes, expected.codes)
            np.testing.assert_array_equal(got.audio, expected.audio)
    assert ours.defaults.top_k == 250 and ours.defaults.guidance_scale == 3.0  # audiocraft's sampling defaults


class RunsCode:
    """A pickled object whose unpickling calls exec: what a weights_only load must never run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, tiny_mono_dir):
    export, t5, codec = write_export(tiny_mono_dir, tmp_path)
    marker = tmp_path / "code-ran"
    package = torch.load(export / "state_dict.bin", weights_only=True)
    package["xp.cfg"] = RunsCode(marker)
    torch.save(package, export / "state_dict.bin")
    with pytest.raises(CheckpointError, match=r"Unsupported global: GLOBAL exec\); fastgen reads .*weights_only=True"):
        load(export, text_encoder=t5, audio_encoder=codec)
    assert not marker.exists()
    # the file is live: unpickled the ordinary way, it does run its code (here only writing the marker)
    with open(export / "state_dict.bin", "rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.read_text() == "ran"


def test_the_compression_package_is_read_as_safely(tmp_path, tiny_mono_dir):
    export, t5, codec = write_export(tiny_mono_dir, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"pretrained": RunsCode(marker), "exported": True}, export / "compression_state_dict.bin")
    with pytest.raises(CheckpointError, match="compression_state_dict.bin: holds more than tensors"):
        load(export, text_encoder=t5)  # no audio_encoder: the reference must be read
    assert not marker.exists()
    torch.save({"best_state": {"encoder.model.0.conv.conv.weight": torch.zeros(2, 1, 7)}, "xp.cfg": "{}",
                "exported": True}, export / "compression_state_dict.bin")
    with pytest.raises(CheckpointError, match="audiocraft EnCodec weights, which fastgen does not map"):
        load(export, text_encoder=t5)


def edit_package(export, edit) -> None:
    package = torch.load(export / "state_dict.bin", weights_only=True)
    edit(package)
    torch.save(package, export / "state_dict.bin")


@pytest.mark.parametrize("case, edit, message", [
    ("unknown weight", lambda p: p["best_state"].update({"transformer.layers.0.gate.weight": torch.zeros(2)}),
     "unexpected weight transformer.layers.0.gate.weight"),
    ("missing weight", lambda p: p["best_state"].pop("linears.3.weight"), "decoder.lm_heads.3.weight is missing"),
    ("rotary positions", lambda p: p.update({"xp.cfg": p["xp.cfg"].replace("positional_embedding: sin",
                                                                           "positional_embedding: rope")}),
     "transformer_lm.positional_embedding is 'rope'"),
    ("unresolvable size", lambda p: p.update({"xp.cfg": p["xp.cfg"].replace("card: ${card}", "card: ${oc.env:X}")}),
     "transformer_lm.card is '\\${oc.env:X}', an interpolation"),
    ("bad YAML", lambda p: p.update({"xp.cfg": "transformer_lm: [unclosed"}), "not valid YAML"),
    ("YAML tags", lambda p: p.update({"xp.cfg": "!!python/object/apply:os.system ['true']"}), "not valid YAML"),
    ("not a package", lambda p: p.pop("best_state"), "'best_state' must be a dict"),
])
def test_malformed_exports_are_refused_by_name(tmp_path, tiny_mono_dir, case, edit, message):
    export, t5, codec = write_export(tiny_mono_dir, tmp_path)
    edit_package(export, edit)
    with pytest.raises(CheckpointError, match=message):
        load(export, text_encoder=t5, audio_encoder=codec)


def test_encoder_folders_are_for_exports_only(tiny_mono_dir, tmp_path):
    with pytest.raises(CheckpointError, match="for audiocraft exports"):
        load(tiny_mono_dir, text_encoder=tmp_path)
    export, t5, codec = write_export(tiny_mono_dir, tmp_path)
    with pytest.raises(CheckpointError, match="text encoder .T5.*no config.json"):
        load(export, text_encoder=tmp_path, audio_encoder=codec)


def test_pickle_module_is_not_needed(tmp_path, tiny_mono_dir, monkeypatch):
    """Nothing in the load goes through pickle.load / pickle.loads (the Unpickler weights_only uses is torch's)."""
    export, t5, codec = write_export(tiny_mono_dir, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle.load called")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load(export, text_encoder=t5, audio_encoder=codec)


def test_inspect_reads_an_export_without_its_weights(tmp_path, tiny_melody_mono_dir, tiny_mono_dir):
    export, t5, codec = write_export(tiny_melody_mono_dir, tmp_path)
    info = fastgen.MusicGen.inspect(export, 4.0, text_encoder=t5, audio_encoder=codec)
    reference = fastgen.MusicGen.inspect(tiny_melody_mono_dir, 4.0)
    assert info.melody and reference.melody
    assert (info.sample_rate, info.frame_rate, info.audio_channels, info.max_duration_s) == \
        (reference.sample_rate, reference.frame_rate, reference.audio_channels, reference.max_duration_s)
    assert info.defaults.top_k == 250
    text_export = write_export(tiny_mono_dir, tmp_path / "text")[0]
    assert not fastgen.MusicGen.inspect(text_export, text_encoder=t5, audio_encoder=codec).melody

"""A checkpoint, whatever its kind: a Hugging Face MusicGen folder (or hub id), or an audiocraft export
(fastgen.model.audiocraft), read into the LoadedParts the model is built from."""
from __future__ import annotations

from pathlib import Path

from fastgen.config import ModelConfig
from fastgen.errors import CheckpointError
from fastgen.model import audiocraft
from fastgen.model.loader import (KNOWN_PREFIXES, LoadedParts, read_generation_config, read_weights,
                                  resolve_checkpoint)


def load_parts(name_or_path: str | Path, *, allow_pickle: bool = False, text_encoder: str | Path | None = None,
               audio_encoder: str | Path | None = None) -> LoadedParts:
    """A Hugging Face MusicGen folder (or hub id), or an audiocraft export (fastgen.model.audiocraft: state_dict.bin
    without config.json), whose T5 and EnCodec come from ``text_encoder`` / ``audio_encoder`` (Hugging Face folders
    or hub ids; default the models its files name)."""
    folder = resolve_checkpoint(name_or_path)
    if audiocraft.is_export(folder):
        return audiocraft.load_export(folder, text_encoder=text_encoder, audio_encoder=audio_encoder)
    if text_encoder is not None or audio_encoder is not None:
        raise CheckpointError(f"{folder}: text_encoder and audio_encoder are for audiocraft exports "
                              f"({audiocraft.EXPORT_LM}); a Hugging Face checkpoint holds its own T5 and EnCodec")
    config = ModelConfig.from_file(folder / "config.json")
    generation_config = read_generation_config(folder)
    weights = read_weights(folder, allow_pickle=allow_pickle)
    stray = [k for k in weights if not k.startswith(KNOWN_PREFIXES)]
    if stray:
        raise CheckpointError(f"{folder}: {len(stray)} unexpected weight(s) that belong to no part of MusicGen, "
                              f"e.g. {stray[0]}")
    return LoadedParts(folder, config, weights, generation_config)

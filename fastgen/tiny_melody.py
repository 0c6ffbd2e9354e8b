"""Random-weight MusicGen-Melody checkpoints in Hugging Face format (``MusicgenMelodyForConditionalGeneration``).

The same layout as :mod:`fastgen.tiny` (config.json, model.safetensors, generation_config.json, tokenizer files) plus
the melody feature extractor's ``preprocessor_config.json``, so fastgen and transformers read the folder as they would
a hub download of ``facebook/musicgen-melody``. The tiny model shares :func:`fastgen.tiny.tiny_config`'s T5, EnCodec
and decoder sizes; its decoder has no cross-attention (the melody decoder conditions through a prefix).

Usage: ``python -m fastgen.tiny_melody OUT_DIR [--stereo] [--chroma-length N]``.
"""
from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Sequence

import torch
from transformers import MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration

from fastgen.model.codec import quiet_token_id_warnings
from fastgen.tiny import _prepare_dir, generation_config, tiny_config
from fastgen.tiny_tokenizer import _write_json, save_tokenizer
from fastgen.tiny_weights import SAMPLING_RATE, _init_codebooks, _normal_, _reinit_codec, _reinit_decoder, _seeded

__all__ = ["build_tiny_melody_checkpoint", "melody_feature_config", "tiny_melody_config"]

# the fields of the decoder section that carry over from the text model's (MusicgenDecoderConfig) unchanged
_DECODER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                   "max_position_embeddings", "num_codebooks", "audio_channels", "pad_token_id", "bos_token_id")
# a short chroma prefix keeps the tests quick; test melodies of a few seconds are then both tiled and cut
TINY_CHROMA_LENGTH = 40


def tiny_melody_config(*, stereo: bool = False, chroma_length: int = TINY_CHROMA_LENGTH,
                       decoder_layers: int = 2) -> MusicgenMelodyConfig:
    """The tiny text model's sizes as a melody model: 12 chroma bins != width 64, so audio_enc_to_dec_proj exists."""
    text_model = tiny_config(stereo=stereo, decoder_layers=decoder_layers)
    decoder = text_model.decoder.to_dict()
    melody_decoder = MusicgenMelodyDecoderConfig(**{name: decoder[name] for name in _DECODER_FIELDS})
    special_id = melody_decoder.vocab_size
    return MusicgenMelodyConfig(text_encoder=text_model.text_encoder, audio_encoder=text_model.audio_encoder,
                                decoder=melody_decoder, num_chroma=12, chroma_length=chroma_length,
                                pad_token_id=special_id, decoder_start_token_id=special_id)


def melody_feature_config() -> dict:
    """preprocessor_config.json of facebook/musicgen-melody's feature extractor (written by hand: transformers'
    MusicgenMelodyFeatureExtractor cannot be built without torchaudio)."""
    return {"feature_extractor_type": "MusicgenMelodyFeatureExtractor", "processor_class": "MusicgenMelodyProcessor",
            "feature_size": 12, "num_chroma": 12, "sampling_rate": SAMPLING_RATE, "n_fft": 16384,
            "hop_length": 4096, "chunk_length": 30, "padding_side": "right", "padding_value": 0.0,
            "return_attention_mask": True, "stem_indices": [3, 2]}


@torch.no_grad()
def _reinit_chroma_projection(model: MusicgenMelodyForConditionalGeneration, generator: torch.Generator) -> None:
    """A one-hot chroma row selects one column of the projection: unit-scale columns make the melody matter to the
    logits as much as the text does (transformers' std-0.02 init would make it all but invisible)."""
    projection = model.audio_enc_to_dec_proj
    _normal_(projection.weight, 1.0, generator)
    _normal_(projection.bias, 0.02, generator)


def build_tiny_melody_checkpoint(path: str | pathlib.Path, *, stereo: bool = False, seed: int = 0,
                                 chroma_length: int = TINY_CHROMA_LENGTH, overwrite: bool = False) -> pathlib.Path:
    """Writes a test-sized MusicGen-Melody checkpoint to ``path`` and returns the folder (same seed, same weights).
    Stereo: 8 interleaved codebooks decoded by a mono EnCodec, like musicgen-stereo-melody."""
    path = _prepare_dir(path, overwrite)
    with quiet_token_id_warnings():
        config = tiny_melody_config(stereo=stereo, chroma_length=chroma_length)
        with _seeded(seed, torch.float32):
            model = MusicgenMelodyForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(seed)
        _reinit_decoder(model, generator)
        _reinit_chroma_projection(model, generator)
        _reinit_codec(model.audio_encoder, generator)
        _init_codebooks(model.audio_encoder, generator)
        model.generation_config = generation_config(config, top_k=50, max_length=256)
        model.eval().save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    _write_json(path / "preprocessor_config.json", melody_feature_config())
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastgen.tiny_melody", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--stereo", action="store_true")
    parser.add_argument("--chroma-length", type=int, default=TINY_CHROMA_LENGTH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.chroma_length <= 4096 or math.isnan(args.chroma_length):
        parser.error("--chroma-length must be in [1, 4096]")
    print(build_tiny_melody_checkpoint(args.out_dir, stereo=args.stereo, seed=args.seed,
                                       chroma_length=args.chroma_length, overwrite=args.overwrite))


if __name__ == "__main__":
    main()

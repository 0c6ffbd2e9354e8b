"""The tiny checkpoint builder: loadable by transformers, deterministic, and useful for tests."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from fastgen.tiny import CODEBOOKS_PER_CHANNEL, build_tiny_checkpoint, main, real_config

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def load_reference(folder: pathlib.Path):
    from transformers import MusicgenForConditionalGeneration

    model, info = MusicgenForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


@pytest.mark.parametrize("layout", ["mono", "stereo"])
def test_transformers_loads_every_key(layout, tiny_mono_dir, tiny_stereo_dir):
    folder = tiny_mono_dir if layout == "mono" else tiny_stereo_dir
    assert {p.name for p in folder.iterdir()} >= EXPECTED_FILES
    model, info = load_reference(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.enc_to_dec_proj is not None  # T5 width != decoder width


def test_layouts(tiny_mono_dir, tiny_stereo_dir):
    mono = json.loads((tiny_mono_dir / "config.json").read_text())
    stereo = json.loads((tiny_stereo_dir / "config.json").read_text())
    assert (mono["decoder"]["num_codebooks"], mono["decoder"]["audio_channels"]) == (4, 1)
    assert (stereo["decoder"]["num_codebooks"], stereo["decoder"]["audio_channels"]) == (8, 2)
    # musicgen-stereo decodes each channel with the same mono codec.
    assert stereo["audio_encoder"]["audio_channels"] == 1
    for config in (mono, stereo):
        decoder, codec = config["decoder"], config["audio_encoder"]
        assert decoder["hidden_size"] // decoder["num_attention_heads"] >= 16
        assert codec["codebook_size"] == decoder["vocab_size"] == decoder["pad_token_id"]
        assert codec["use_causal_conv"] is False
    generation = json.loads((tiny_mono_dir / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["guidance_scale"] == 3.0
    assert generation["decoder_start_token_id"] == mono["decoder"]["vocab_size"]


def test_tokenizer_works_offline(tiny_mono_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mono_dir)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    vocab_size = json.loads((tiny_mono_dir / "config.json").read_text())["text_encoder"]["vocab_size"]
    for text in ["Happy rock song with guitar", "", "zzqx über café 🎸 日本語", "a, b; (c)!"]:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        assert all(0 <= i < vocab_size for i in ids)
    # Known words are single tokens; accents are stripped rather than lost.
    assert len(tokenizer("lofi hip hop beat").input_ids) == 5
    assert tokenizer("café").input_ids == tokenizer("cafe").input_ids
    assert tokenizer("  Happy   rock\n").input_ids == tokenizer("happy rock").input_ids
    batch = tokenizer(["pop", "calm piano melody"], padding=True)
    assert batch.input_ids[0][-1] == tokenizer.pad_token_id  # right padding
    assert batch.attention_mask[0] == [1, 1, 0, 0]


def test_same_seed_same_files(tiny_mono_dir, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again")
    for name in EXPECTED_FILES:
        assert (again / name).read_bytes() == (tiny_mono_dir / name).read_bytes(), name
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_mono_dir / "model.safetensors").read_bytes()


def test_existing_checkpoint_needs_overwrite(tiny_mono_dir, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_tiny_checkpoint(tiny_mono_dir)
    main([str(tmp_path / "cli"), "--stereo"])  # the CLI writes a fresh folder
    assert {p.name for p in (tmp_path / "cli").iterdir()} >= EXPECTED_FILES


@torch.no_grad()
def test_codec_gives_varied_codes_and_audio(tiny_mono_dir):
    model, _ = load_reference(tiny_mono_dir)
    codec = model.audio_encoder
    noise = 0.3 * torch.randn(1, 1, 32000, generator=torch.Generator().manual_seed(0))
    codes = codec.encode(noise).audio_codes  # [chunks, batch, codebooks, frames]
    assert codes.shape == (1, 1, CODEBOOKS_PER_CHANNEL, 50)
    for codebook in codes[0, 0]:
        assert len(torch.unique(codebook)) > 16
    audio = codec.decode(codes, [None]).audio_values
    other = codec.decode(torch.roll(codes, 7, dims=-1), [None]).audio_values
    assert audio.shape == (1, 1, 32000)
    assert 0.02 < audio.std() < 1.0
    assert (audio - other).abs().mean() > 0.02  # the audio depends on the codes


@torch.no_grad()
def test_greedy_logits_have_clear_margins(tiny_mono_dir):
    from transformers import AutoTokenizer

    model, _ = load_reference(tiny_mono_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_mono_dir)
    inputs = tokenizer(["80s pop track", "slow blues"], padding=True, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, guidance_scale=1.0, max_new_tokens=20,
                         return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape[:2] == (2, 1)
    scores = torch.stack(out.scores)  # [steps, batch * codebooks, vocab]
    top2 = scores.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    assert margins.median() > 0.3
    assert (margins < 1e-3).float().mean() < 0.01
    # The text conditions the logits.
    per_prompt = scores.reshape(len(out.scores), 2, -1)
    assert (per_prompt[:, 0] - per_prompt[:, 1]).abs().mean() > 0.1


def test_real_configs_match_published_shapes():
    small = real_config("small")
    assert (small.decoder.hidden_size, small.decoder.num_hidden_layers, small.decoder.ffn_dim) == (1024, 24, 4096)
    assert small.text_encoder.d_model == 768 and small.text_encoder.vocab_size == 32128
    assert small.audio_encoder.num_quantizers == 4 and small.audio_encoder.frame_rate == 50
    large = real_config("large", stereo=True)
    assert (large.decoder.hidden_size, large.decoder.num_attention_heads) == (2048, 32)
    assert (large.decoder.num_codebooks, large.decoder.audio_channels) == (8, 2)
    with pytest.raises(ValueError, match="size must be one of"):
        real_config("huge")

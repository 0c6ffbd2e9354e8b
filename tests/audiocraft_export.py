"""Writes an audiocraft export of a Hugging Face MusicGen folder (the inverse of fastgen.model.audiocraft's key
mapping, as audiocraft's export_lm would have written the model), and the Hugging Face T5 and EnCodec folders it
needs beside it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def xp_cfg(config: dict, stereo: bool, melody: bool) -> str:
    """A training config as OmegaConf.to_yaml writes it: ${…} references left as they are (one that fastgen does not
    need cannot even be resolved), the keys fastgen reads among many it does not."""
    decoder = config["decoder"]
    chroma_duration = (config.get("chroma_length", 235) - 1) * 4096 / 32000 + 0.1  # 1 + samples // hop frames
    fuser = ("  prepend: [self_wav, description]\n  cross: []\n" if melody else
             "  prepend: []\n  cross: [description]\n")
    self_wav = ("  self_wav:\n    model: chroma_stem\n    chroma_stem:\n      sample_rate: ${sample_rate}\n"
                "      n_chroma: 12\n      radix2_exp: 14\n      argmax: true\n      match_len_on_eval: false\n"
                if melody else "")
    delays = [k // (2 if stereo else 1) for k in range(decoder["num_codebooks"])]
    return f"""device: cuda
sample_rate: 32000
channels: {2 if stereo else 1}
logging:
  log_dir: ${{oc.env:HOME}}/logs
dataset:
  segment_duration: {chroma_duration if melody else 30}
interleave_stereo_codebooks:
  use: {str(stereo).lower()}
  per_timestep: false
codebooks_pattern:
  modeling: delay
  delay:
    delays: {delays}
    flatten_first: 0
    empty_initial: 0
classifier_free_guidance:
  training_dropout: 0.2
  inference_coef: 3.0
fuser:
  cross_attention_pos_emb: false
  sum: []
{fuser}conditioners:
{self_wav}  description:
    model: t5
    t5:
      name: t5-base
      finetune: false
      word_dropout: 0.3
card: {decoder["vocab_size"]}
transformer_lm:
  dim: {decoder["hidden_size"]}
  num_heads: {decoder["num_attention_heads"]}
  num_layers: {decoder["num_hidden_layers"]}
  hidden_scale: {decoder["ffn_dim"] / decoder["hidden_size"]}
  n_q: {decoder["num_codebooks"]}
  card: ${{card}}
  activation: gelu
  norm_first: true
  norm: layer_norm
  bias_ff: false
  bias_attn: false
  bias_proj: false
  cross_attention: false
  positional_embedding: sin
  layer_scale: null
  memory_efficient: true
"""


def write_export(hf_folder: Path, out: Path) -> tuple[Path, Path, Path]:
    """(export folder, T5 folder, EnCodec folder) written under ``out`` from the Hugging Face checkpoint."""
    config = json.loads((hf_folder / "config.json").read_text())
    weights = load_file(str(hf_folder / "model.safetensors"))
    melody = config["model_type"] == "musicgen_melody"
    stereo = config["decoder"]["audio_channels"] == 2
    export, t5, codec = out / "export", out / "t5", out / "encodec"
    for folder in (export, t5, codec):
        folder.mkdir(parents=True)
    layers = config["decoder"]["num_hidden_layers"]
    best_state = {}
    decoder = "decoder.model.decoder."
    for k in range(config["decoder"]["num_codebooks"]):
        best_state[f"emb.{k}.weight"] = weights[f"{decoder}embed_tokens.{k}.weight"]
        best_state[f"linears.{k}.weight"] = weights[f"decoder.lm_heads.{k}.weight"]
    attentions = {"self_attn": "self_attn"} if melody else {"self_attn": "self_attn", "encoder_attn": "cross_attention"}
    norms = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
    if not melody:
        norms["encoder_attn_layer_norm"] = "norm_cross"
    for i in range(layers):
        ours, theirs = f"{decoder}layers.{i}.", f"transformer.layers.{i}."
        for hf, ac in attentions.items():
            best_state[f"{theirs}{ac}.in_proj_weight"] = torch.cat(
                [weights[f"{ours}{hf}.{n}_proj.weight"] for n in "qkv"])
            best_state[f"{theirs}{ac}.out_proj.weight"] = weights[f"{ours}{hf}.out_proj.weight"]
        best_state[f"{theirs}linear1.weight"] = weights[f"{ours}fc1.weight"]
        best_state[f"{theirs}linear2.weight"] = weights[f"{ours}fc2.weight"]
        for hf, ac in norms.items():
            for part in ("weight", "bias"):
                best_state[f"{theirs}{ac}.{part}"] = weights[f"{ours}{hf}.{part}"]
    for part in ("weight", "bias"):
        best_state[f"out_norm.{part}"] = weights[f"{decoder}layer_norm.{part}"]
        best_state[f"condition_provider.conditioners.description.output_proj.{part}"] = weights[
            f"enc_to_dec_proj.{part}"]
        if melody:
            best_state[f"condition_provider.conditioners.self_wav.output_proj.{part}"] = weights[
                f"audio_enc_to_dec_proj.{part}"]
    if melody:  # the chroma extractor's STFT window, a buffer of audiocraft's conditioner
        best_state["condition_provider.conditioners.self_wav.chroma.spec.window"] = torch.hann_window(16384)
    torch.save({"best_state": best_state, "xp.cfg": xp_cfg(config, stereo, melody), "version": "1.3.0",
                "exported": True}, export / "state_dict.bin")
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.3.0"},
               export / "compression_state_dict.bin")
    for folder, section, prefix in ((t5, "text_encoder", "text_encoder."), (codec, "audio_encoder", "audio_encoder.")):
        (folder / "config.json").write_text(json.dumps(config[section]))
        save_file({k[len(prefix):]: v.contiguous() for k, v in weights.items() if k.startswith(prefix)},
                  str(folder / "model.safetensors"))
    for name in TOKENIZER_FILES:
        shutil.copy(hf_folder / name, t5 / name)
    return export, t5, codec

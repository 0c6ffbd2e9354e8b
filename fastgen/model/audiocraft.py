"""audiocraft exports: a MusicGen folder as audiocraft's export writes it, read without unpickling code.

The folder holds ``state_dict.bin`` (the language model: ``export_lm``) and ``compression_state_dict.bin`` (its
EnCodec: ``export_pretrained_compression_model``, usually a reference such as ``facebook/encodec_32khz``). An exported
package is a dict of tensors (``best_state``), a YAML string (``xp.cfg``), a version string and a bool, so
``torch.load(weights_only=True)`` reads all of it; a file that needs more (any other pickled object: code could run)
is refused with a CheckpointError and never loaded another way. ``xp.cfg`` is read with ``yaml.safe_load`` (no
OmegaConf): ``${a.b}`` references to other plain values are looked up, nothing else is evaluated. The keys are mapped
as transformers' MusicGen converters map them (the fused ``in_proj_weight`` split into q, k, v; ``emb`` → the
embeddings, ``linears`` → the LM heads, ``norm1`` / ``norm_cross`` / ``norm2`` / ``out_norm`` → the LayerNorms, the
conditioners' ``output_proj`` → ``enc_to_dec_proj`` / ``audio_enc_to_dec_proj``), and the result loads as a Hugging
Face checkpoint does. Mono, stereo (interleaved codebooks) and melody (chroma) language models.

T5 and EnCodec are not in the package: T5 comes from a Hugging Face folder (``text_encoder=``; default the model
xp.cfg names, from the hub: t5-base → google-t5/t5-base), EnCodec from a Hugging Face EnCodec folder
(``audio_encoder=``; default the pretrained model compression_state_dict.bin names, from the hub). A compression
package holding audiocraft's own EnCodec weights is refused unless ``audio_encoder`` is given: fastgen does not map
those."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from fastgen.config import ModelConfig
from fastgen.errors import CheckpointError
from fastgen.model.audiocraft_config import LanguageModelConfig, model_config
from fastgen.model.loader import LoadedParts, read_weights, resolve_checkpoint

EXPORT_LM = "state_dict.bin"
EXPORT_CODEC = "compression_state_dict.bin"
T5_HUB_IDS = {name: f"google-t5/{name}" for name in ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b")}
# the chroma conditioner's buffers (STFT window, filter bank): fastgen computes the chroma itself
IGNORED_PREFIXES = ("condition_provider.conditioners.self_wav.chroma.",)
DESCRIPTION = "condition_provider.conditioners.description."
SELF_WAV = "condition_provider.conditioners.self_wav."
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_CODEBOOK_KEY = re.compile(r"^(emb|linears)\.(\d+)\.weight$")
LAYER_PARTS = {  # audiocraft's StreamingTransformerLayer → transformers' MusicgenDecoderLayer
    "self_attn.out_proj.weight": "self_attn.out_proj.weight",
    "cross_attention.out_proj.weight": "encoder_attn.out_proj.weight",
    "linear1.weight": "fc1.weight",
    "linear2.weight": "fc2.weight",
    **{f"{ours}.{part}": f"{theirs}.{part}" for part in ("weight", "bias") for ours, theirs in (
        ("norm1", "self_attn_layer_norm"), ("norm_cross", "encoder_attn_layer_norm"), ("norm2", "final_layer_norm"))},
}
FUSED_PARTS = {"self_attn.in_proj_weight": "self_attn", "cross_attention.in_proj_weight": "encoder_attn"}
DECODER = "decoder.model.decoder."


def is_export(folder: Path) -> bool:
    """An audiocraft export: state_dict.bin and no Hugging Face config.json."""
    return (folder / EXPORT_LM).is_file() and not (folder / "config.json").is_file()


def read_package(path: Path, mmap: bool = False) -> dict[str, Any]:
    """An exported package through torch.load(weights_only=True) only: tensors and plain values, never code.
    ``mmap``: the tensors stay in the file, read only if touched (for reading the config alone)."""
    try:
        package = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's own message goes on to say how to allow the global: fastgen names it and stops there
        found = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
        reason = found.group(0) if found else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: holds more than tensors and plain values ({reason[:300]}); fastgen reads "
                              "audiocraft exports with torch.load(weights_only=True) only, and loads such a file no "
                              "other way (unpickling it could run code). Export it with audiocraft's export_lm / "
                              "export_encodec, which store xp.cfg as YAML text") from None
    except Exception as exc:  # truncated, not a torch file, …
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {str(exc)[:300]})") from None
    if not isinstance(package, dict):
        raise CheckpointError(f"{path}: expected an exported package (a dict), got {type(package).__name__}")
    return package


def _language_model(folder: Path, mmap: bool = False) -> tuple[dict[str, torch.Tensor], LanguageModelConfig]:
    path = folder / EXPORT_LM
    package = read_package(path, mmap)
    state, cfg = package.get("best_state"), package.get("xp.cfg")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: 'best_state' must be a dict of named tensors (audiocraft's export_lm)")
    if not isinstance(cfg, str):
        raise CheckpointError(f"{path}: 'xp.cfg' must be the YAML text of the training config, got "
                              f"{type(cfg).__name__}")
    return state, LanguageModelConfig.from_yaml(cfg, str(path))


def _codec_reference(folder: Path) -> str:
    """The hub id of the pretrained EnCodec compression_state_dict.bin names (audiocraft's '//pretrained/…')."""
    path = folder / EXPORT_CODEC
    if not path.is_file():
        raise CheckpointError(f"{folder}: {EXPORT_CODEC} is missing; pass audio_encoder= a Hugging Face EnCodec "
                              "folder (e.g. one of facebook/encodec_32khz)")
    package = read_package(path)
    reference = package.get("pretrained")
    if isinstance(reference, str) and reference.strip():
        return reference.strip().removeprefix("//pretrained/")
    if "best_state" in package:
        raise CheckpointError(f"{path} holds audiocraft EnCodec weights, which fastgen does not map; pass "
                              "audio_encoder= a Hugging Face EnCodec folder of the same model (transformers' "
                              "convert_encodec_checkpoint_to_pytorch.py makes one)")
    raise CheckpointError(f"{path}: neither a pretrained reference nor weights")


def _resolve(name_or_path: str | Path, role: str) -> Path:
    try:
        folder = resolve_checkpoint(name_or_path)
    except CheckpointError as exc:
        raise CheckpointError(f"the {role} of the audiocraft export: {exc}") from None
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: the {role} folder has no config.json (a Hugging Face folder is needed)")
    return folder


def map_state(state: dict[str, torch.Tensor], config: LanguageModelConfig, source: str) -> dict[str, torch.Tensor]:
    """audiocraft's LM state dict → the Hugging Face MusicGen names fastgen loads."""
    mapped: dict[str, torch.Tensor] = {}
    dim = config.dim
    for key, tensor in state.items():
        layer = _LAYER_KEY.match(key)
        codebook = _CODEBOOK_KEY.match(key)
        if key.startswith(IGNORED_PREFIXES):
            continue
        if layer and layer.group(2) in FUSED_PARTS:
            if tensor.dim() != 2 or tensor.shape[0] != 3 * dim:
                raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected ({3 * dim}, {dim})")
            base = f"{DECODER}layers.{layer.group(1)}.{FUSED_PARTS[layer.group(2)]}"
            for name, part in zip("qkv", tensor.split(dim)):
                mapped[f"{base}.{name}_proj.weight"] = part.contiguous()
        elif layer and layer.group(2) in LAYER_PARTS:
            mapped[f"{DECODER}layers.{layer.group(1)}.{LAYER_PARTS[layer.group(2)]}"] = tensor
        elif codebook:
            target = f"{DECODER}embed_tokens" if codebook.group(1) == "emb" else "decoder.lm_heads"
            mapped[f"{target}.{codebook.group(2)}.weight"] = tensor
        elif key.startswith("out_norm."):
            mapped[f"{DECODER}layer_norm.{key.removeprefix('out_norm.')}"] = tensor
        elif key.startswith(DESCRIPTION + "output_proj."):
            mapped["enc_to_dec_proj." + key.removeprefix(DESCRIPTION + "output_proj.")] = tensor
        elif key.startswith(SELF_WAV + "output_proj.") and config.melody is not None:
            mapped["audio_enc_to_dec_proj." + key.removeprefix(SELF_WAV + "output_proj.")] = tensor
        elif key.startswith(DESCRIPTION + "t5."):  # a fine-tuned T5 (t5.finetune: true) is saved with the LM
            mapped["text_encoder." + key.removeprefix(DESCRIPTION + "t5.")] = tensor
        else:
            raise CheckpointError(f"{source}: unexpected weight {key} (not part of an audiocraft MusicGen language "
                                  "model fastgen knows)")
    return mapped


def _hub_weights(folder: Path, prefix: str, keep) -> dict[str, torch.Tensor]:
    weights = read_weights(folder)
    return {prefix + key: weights[key] for key in list(weights) if keep(key)}


def _parts(folder: Path, lm: LanguageModelConfig, text_encoder: str | Path | None,
           audio_encoder: str | Path | None) -> tuple[Path, Path, ModelConfig]:
    """The T5 and EnCodec folders of an export and the ModelConfig of the three."""
    import json
    t5_folder = _resolve(text_encoder if text_encoder is not None else T5_HUB_IDS.get(lm.t5_name, lm.t5_name),
                         "text encoder (T5)")
    codec_folder = _resolve(audio_encoder if audio_encoder is not None else _codec_reference(folder),
                            "audio encoder (EnCodec)")
    configs = {}
    for role, sub in (("text_encoder", t5_folder), ("audio_encoder", codec_folder)):
        try:
            configs[role] = json.loads((sub / "config.json").read_text())
        except ValueError as exc:
            raise CheckpointError(f"{sub / 'config.json'}: not valid JSON ({exc})") from None
    config = model_config(lm, configs["text_encoder"], configs["audio_encoder"], source=str(folder / EXPORT_LM))
    return t5_folder, codec_folder, config


def read_config(folder: Path, *, text_encoder: str | Path | None = None, audio_encoder: str | Path | None = None
                ) -> tuple[ModelConfig, dict[str, Any]]:
    """An export's ModelConfig and generation defaults, its weights left unread (MusicGen.inspect)."""
    try:
        _, lm = _language_model(folder, mmap=True)
    except CheckpointError:  # an old (not zip) torch file cannot be mapped: read it whole
        _, lm = _language_model(folder)
    return _parts(folder, lm, text_encoder, audio_encoder)[2], lm.generation_config()


def load_export(folder: Path, *, text_encoder: str | Path | None = None, audio_encoder: str | Path | None = None):
    """LoadedParts (fastgen.model.loader) of an audiocraft export, with the T5 and EnCodec folders it needs."""
    state, lm = _language_model(folder)
    t5_folder, codec_folder, config = _parts(folder, lm, text_encoder, audio_encoder)
    weights = map_state(state, lm, str(folder / EXPORT_LM))
    if not any(key.startswith("text_encoder.") for key in weights):
        weights.update(_hub_weights(t5_folder, "text_encoder.",
                                    lambda key: key == "shared.weight" or key.startswith("encoder.")))
    weights.update(_hub_weights(codec_folder, "audio_encoder.", lambda key: True))
    return LoadedParts(folder, config, weights, lm.generation_config(), chroma=lm.chroma, tokenizer_folder=t5_folder)

"""Checkpoint loading: resolve a folder (or hub id), read safetensors (single or sharded) with clear errors, and build
the pieces: fastgen's decoder, transformers' T5 encoder and EnCodec, the tokenizer and the generation defaults."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastgen.config import ModelConfig
from fastgen.errors import CheckpointError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (safetensors only) into the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{text} is a file; pass the checkpoint folder that holds config.json")
    if not _HUB_ID.match(text):
        raise CheckpointError(f"checkpoint folder {text!r} does not exist (and it is not a hub id like "
                              "'facebook/musicgen-small')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # any network/auth/not-found failure becomes one clear message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not fetch {text!r} from the Hugging Face hub ({type(exc).__name__}: "
                              f"{reason[:300]}); download it where you have network access and pass the "
                              "local folder") from None


def read_weights(folder: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint on the CPU. safetensors single or sharded; pickled .bin only when the user
    opts in, and then only through torch.load(weights_only=True)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        return _read_sharded(folder)
    if (folder / SAFETENSORS_SINGLE).is_file():
        return _read_safetensors(folder / SAFETENSORS_SINGLE)
    pickled = [folder / n for n in (PICKLE_SINGLE, PICKLE_INDEX) if (folder / n).is_file()]
    if pickled and not allow_pickle:
        raise CheckpointError(f"{folder} only has pickled weights ({pickled[0].name}); pickles can run code, so "
                              "fastgen refuses them. Convert to safetensors, or pass allow_pickle=True to load "
                              "them with torch.load(weights_only=True)")
    if pickled:
        return _read_pickled(folder)
    raise CheckpointError(f"{folder} has no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        return tensors
    except Exception as exc:  # truncated or corrupt files surface as SafetensorError / OSError
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc}); is it truncated or corrupt?") from None


def _read_sharded(folder: Path) -> dict[str, torch.Tensor]:
    index_path = folder / SAFETENSORS_INDEX
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: malformed index ({exc})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path} names shard {shard}, which is missing from {folder}")
        tensors.update(_read_safetensors(shard_path))
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise CheckpointError(f"{index_path} lists {len(absent)} tensor(s) not found in their shards, "
                              f"e.g. {absent[0]}")
    return tensors


def _read_pickled(folder: Path) -> dict[str, torch.Tensor]:
    files = [folder / PICKLE_SINGLE]
    if (folder / PICKLE_INDEX).is_file():
        weight_map = json.loads((folder / PICKLE_INDEX).read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load with weights_only=True ({exc})") from None
    return tensors


def take_prefixed(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_submodule(module: torch.nn.Module, weights: dict[str, torch.Tensor], label: str,
                   optional: set[str] = frozenset()) -> torch.nn.Module:
    """Load a transformers module strictly, mapping old weight-norm names (weight_g/weight_v, as in the original
    facebook exports) to torch's parametrization names, and naming any missing or unexpected key."""
    expected = module.state_dict()
    renamed = {}
    for key, tensor in weights.items():
        if key not in expected and key.endswith((".weight_g", ".weight_v")):
            alt = key[:-len("weight_g")] + ("parametrizations.weight.original0" if key.endswith("_g")
                                            else "parametrizations.weight.original1")
            if alt in expected:
                key = alt
        renamed[key] = tensor
    missing = [k for k in expected if k not in renamed and k not in optional]
    unexpected = [k for k in renamed if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {label}.{missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {label}.{unexpected[0]}")
        raise CheckpointError(f"{label} weights do not match its config: " + "; ".join(parts))
    for key, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"weight {label}.{key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[key].shape)} from config.json")
    module.load_state_dict(renamed, strict=False)
    return module


@dataclass
class LoadedParts:
    folder: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    generation_config: dict[str, Any]


def load_parts(name_or_path: str | Path, *, allow_pickle: bool = False) -> LoadedParts:
    folder = resolve_checkpoint(name_or_path)
    config = ModelConfig.from_file(folder / "config.json")
    generation_config: dict[str, Any] = {}
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        try:
            generation_config = json.loads(gen_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{gen_path}: not valid JSON ({exc})") from None
    weights = read_weights(folder, allow_pickle=allow_pickle)
    return LoadedParts(folder, config, weights, generation_config)

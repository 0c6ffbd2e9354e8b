"""Checkpoint loading: resolve a folder (or hub id), read safetensors (single or sharded) with clear errors, and build
the pieces: fastgen's decoder, transformers' T5 encoder and EnCodec, the tokenizer and the generation defaults."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from fastgen.config import ModelConfig
from fastgen.errors import CheckpointError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
KNOWN_PREFIXES = ("decoder.", "enc_to_dec_proj.", "audio_enc_to_dec_proj.", "text_encoder.", "audio_encoder.")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
HUB_TIMEOUT_S = 10.0  # seconds to wait for the hub (HF_HUB_ETAG_TIMEOUT overrides)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# weights are real floating point; anything else (int8, bool, complex) is a corrupt or foreign file
WEIGHT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


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
        return _download(text)
    except Exception as exc:  # any network/auth/not-found failure becomes one clear message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{text!r} is not a local folder, and fetching it from the Hugging Face hub failed "
                              f"({type(exc).__name__}: {reason[:300]}); download it where you have network access "
                              "and pass the local folder") from None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _download(repo_id: str) -> Path:
    """snapshot_download, but bounded in time: huggingface_hub's first request (repo_info) has no timeout, so an
    unresponsive network would hang for good. Ask for the commit with a timeout; on a network failure fall back to
    the local hub cache."""
    from huggingface_hub import HfApi, snapshot_download
    if _hub_offline():
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_TIMEOUT_S)
    try:
        revision = HfApi().repo_info(repo_id, timeout=timeout).sha
    except Exception as exc:
        if getattr(exc, "response", None) is not None:  # the hub answered: not found, gated, ...
            raise
        try:  # no answer: a copy in the cache will do
            return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:
            raise exc from None
    return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS))


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


class LazyTensors(MutableMapping):
    """Checkpoint tensors read from their safetensors file only when taken: with the loader popping what it uses,
    the file's copy of a weight lives only until fastgen holds its own, so loading peaks near the model's size."""

    def __init__(self) -> None:
        self._where: dict[str, Path] = {}

    def add_file(self, path: Path) -> None:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys = list(handle.keys())
                dtypes = {key: handle.get_slice(key).get_dtype() for key in keys}
        except Exception as exc:  # truncated or corrupt files surface as SafetensorError / OSError
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc}); is it truncated or corrupt?") \
                from None
        for key in keys:
            _check_dtype(path, key, dtypes[key])
        for key in keys:
            self._where[key] = path

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open
        path = self._where[key]
        try:
            # A private copy, through a memory map opened for this tensor alone: a view into a map held open for
            # the whole load would keep every page loading touched resident (the unfused q/k/v, say) for as long
            # as any weight lives, and a copy through a long-lived map would count the file twice until the end.
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(key).clone()
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key} ({exc}); is the file truncated or corrupt?") \
                from None

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        raise TypeError("checkpoint tensors are read-only")

    def __delitem__(self, key: str) -> None:
        del self._where[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where


def _check_dtype(path: Path, key: str, dtype: str | torch.dtype) -> None:
    if dtype not in WEIGHT_DTYPES and dtype not in WEIGHT_DTYPES.values():
        raise CheckpointError(f"{path}: tensor {key} has dtype {dtype}; weights must be floating point "
                              f"({', '.join(WEIGHT_DTYPES)})")


def _shard_path(folder: Path, index_path: Path, shard: Any) -> Path:
    """A shard named by an index, which must be a file name inside the checkpoint folder (an index may come from
    anywhere: "../../etc/x" or "/abs/path" would make the loader read outside it)."""
    name = PurePosixPath(shard) if isinstance(shard, str) else None
    if name is None or not shard or name.is_absolute() or ".." in name.parts or "\\" in shard or ":" in shard:
        raise CheckpointError(f"{index_path} names shard {str(shard)[:100]!r}, which is not a file name inside the "
                              "checkpoint folder")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{index_path} names shard {shard}, which is missing from {folder}")
    return path


def _read_safetensors(path: Path) -> LazyTensors:
    tensors = LazyTensors()
    tensors.add_file(path)
    return tensors


def _read_sharded(folder: Path) -> dict[str, torch.Tensor]:
    index_path = folder / SAFETENSORS_INDEX
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of tensor name → shard file name")
    except (ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{index_path}: malformed index ({type(exc).__name__}: {exc})") from None
    tensors = LazyTensors()
    for shard in sorted(set(weight_map.values())):
        tensors.add_file(_shard_path(folder, index_path, shard))
    absent = [k for k in weight_map if k not in tensors]
    if absent:
        raise CheckpointError(f"{index_path} lists {len(absent)} tensor(s) not found in their shards, "
                              f"e.g. {absent[0]}")
    return tensors


def _read_pickled(folder: Path) -> dict[str, torch.Tensor]:
    files = [folder / PICKLE_SINGLE]
    index_path = folder / PICKLE_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted(set(str(v) for v in weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index_path}: malformed index ({type(exc).__name__}: {exc})") from None
        files = [_shard_path(folder, index_path, shard) for shard in shards]
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load with weights_only=True ({exc})") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in loaded.items()):
            raise CheckpointError(f"{path}: expected a dict of named tensors")
        for key, tensor in loaded.items():
            _check_dtype(path, key, tensor.dtype)
        tensors.update(loaded)
    return tensors


def take_prefixed(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove the tensors under ``prefix`` from ``weights`` and return them with the prefix stripped."""
    keys = [k for k in weights if k.startswith(prefix)]
    return {k[len(prefix):]: weights.pop(k) for k in keys}


def load_submodule(module: torch.nn.Module, weights: dict[str, torch.Tensor], label: str,
                   optional: set[str] = frozenset(), assign: bool = False) -> torch.nn.Module:
    """Load a transformers module strictly, mapping old weight-norm names (weight_g/weight_v, as in the original
    facebook exports) to torch's parametrization names, and naming any missing or unexpected key."""
    renamed = check_weights(module.state_dict(), weights, label, optional)
    module.load_state_dict(renamed, strict=False, assign=assign)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{label}: {len(left)} tensor(s) were not loaded, e.g. {label}.{left[0]}")
    return module


def check_weights(expected: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], label: str,
                  optional: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``weights`` checked against a module's ``expected`` state dict (names and shapes), with old weight-norm
    names mapped; returns them under the module's names."""
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
    return renamed


@dataclass
class LoadedParts:
    folder: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    generation_config: dict[str, Any]
    chroma: Any = None  # a melody model's ChromaSettings when not read from the folder (fastgen.model.chroma)
    tokenizer_folder: Path | None = None  # where the tokenizer is, when not in ``folder`` (an audiocraft export)


def read_generation_config(folder: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when the checkpoint has none)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        generation_config = json.loads(path.read_text())
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(generation_config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(generation_config).__name__}")
    return generation_config

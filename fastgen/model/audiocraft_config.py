"""The training config (``xp.cfg``) of an audiocraft MusicGen export, read with ``yaml.safe_load``: the language
model's sizes, its conditioning (text by cross-attention, or chroma and text as a prefix: a melody model), the chroma
settings and the generation defaults. Only plain values are read; ``${a.b}`` references to other plain values are
looked up (OmegaConf's syntax; nothing is evaluated) and anything fastgen cannot run is refused by name."""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any

from fastgen.config import SUPPORTED_ACTIVATIONS, MelodyConfig, ModelConfig
from fastgen.errors import CheckpointError
from fastgen.model.chroma import ChromaSettings

MAX_POSITIONS = 2048  # audiocraft's sinusoid has no table; transformers' converter gives the HF model this many
_REFERENCE = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
_MISSING = object()
# transformer_lm settings fastgen's decoder assumes: a value other than these is refused (absent: assumed)
REQUIRED_LM = {"norm": "layer_norm", "norm_first": True, "positional_embedding": "sin", "bias_ff": False,
               "bias_attn": False, "bias_proj": False, "layer_scale": None, "qk_layer_norm": False,
               "qk_layer_norm_cross": False, "kv_repeat": 1, "positional_scale": 1.0, "max_period": 10000,
               "xpos": False, "causal": True, "past_context": None}


class _Config:
    """Lookups in the parsed YAML with ${…} references resolved, each error naming the dotted key."""

    def __init__(self, root: Any, source: str) -> None:
        self.root, self.source = root, source

    def get(self, path: str, default: Any = _MISSING) -> Any:
        value = self._lookup(path)
        for _ in range(16):  # a reference to a reference …; a cycle ends here
            match = _REFERENCE.match(value) if isinstance(value, str) else None
            if match is None:
                break
            value = self._lookup(match.group(1))
        if value is _MISSING:
            if default is _MISSING:
                raise CheckpointError(f"{self.source}: xp.cfg has no {path}")
            return default
        if isinstance(value, str) and "${" in value:
            raise CheckpointError(f"{self.source}: xp.cfg {path} is {value!r}, an interpolation fastgen cannot resolve")
        return value

    def _lookup(self, path: str) -> Any:
        node = self.root
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def int(self, path: str, default: Any = _MISSING) -> int:
        value = self.get(path, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 20:
            raise CheckpointError(f"{self.source}: xp.cfg {path} must be a positive integer, got {value!r}")
        return value

    def number(self, path: str, default: Any = _MISSING) -> float:
        value = self.get(path, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1e6:
            raise CheckpointError(f"{self.source}: xp.cfg {path} must be a positive number, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class LanguageModelConfig:
    dim: int
    num_heads: int
    num_layers: int
    ffn_dim: int
    n_q: int
    card: int
    channels: int
    activation: str
    t5_name: str
    guidance_scale: float
    melody: MelodyConfig | None = None
    chroma: ChromaSettings | None = None

    @classmethod
    def from_yaml(cls, text: str, source: str) -> "LanguageModelConfig":
        import yaml  # PyYAML (a dependency: transformers needs it too); safe_load builds plain values only
        try:
            root = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{source}: xp.cfg is not valid YAML ({str(exc)[:300]})") from None
        if not isinstance(root, dict):
            raise CheckpointError(f"{source}: xp.cfg must be a YAML mapping, got {type(root).__name__}")
        cfg = _Config(root, source)
        for name, required in REQUIRED_LM.items():
            value = cfg.get(f"transformer_lm.{name}", required)
            if value != required:
                raise CheckpointError(f"{source}: xp.cfg transformer_lm.{name} is {value!r}; fastgen runs MusicGen's "
                                      f"decoder, which has {required!r}")
        activation = cfg.get("transformer_lm.activation", "gelu")
        if activation not in SUPPORTED_ACTIVATIONS:
            raise CheckpointError(f"{source}: xp.cfg transformer_lm.activation {activation!r} is not one of "
                                  f"{SUPPORTED_ACTIVATIONS}")
        dim, n_q = cfg.int("transformer_lm.dim"), cfg.int("transformer_lm.n_q")
        channels = 2 if cfg.get("interleave_stereo_codebooks.use", False) else cfg.int("channels", 1)
        _check_pattern(cfg, n_q, channels)
        melody, chroma = _conditioning(cfg)
        return cls(dim=dim, num_heads=cfg.int("transformer_lm.num_heads"),
                   num_layers=cfg.int("transformer_lm.num_layers"),
                   ffn_dim=int(dim * cfg.number("transformer_lm.hidden_scale", 4.0)), n_q=n_q,
                   card=cfg.int("transformer_lm.card"), channels=channels, activation=activation,
                   t5_name=str(cfg.get("conditioners.description.t5.name", "t5-base")),
                   guidance_scale=cfg.number("classifier_free_guidance.inference_coef", 3.0), melody=melody,
                   chroma=chroma)

    def generation_config(self) -> dict[str, Any]:
        """audiocraft's sampling defaults (top-k 250, guidance from the config), 30 s as transformers' converter
        sets them."""
        return {"do_sample": True, "guidance_scale": self.guidance_scale, "top_k": 250, "max_length": 1500}


def _check_pattern(cfg: _Config, n_q: int, channels: int) -> None:
    modeling = cfg.get("codebooks_pattern.modeling", "delay")
    if modeling != "delay":
        raise CheckpointError(f"{cfg.source}: xp.cfg codebooks_pattern.modeling is {modeling!r}; fastgen runs "
                              "MusicGen's delay pattern")
    delays = cfg.get("codebooks_pattern.delay.delays", None)
    expected = [k // channels for k in range(n_q)]
    if delays is not None and list(delays) != expected:
        raise CheckpointError(f"{cfg.source}: xp.cfg codebooks_pattern.delay.delays is {delays!r}, expected "
                              f"{expected} for {n_q} codebooks over {channels} channel(s)")


def _conditioning(cfg: _Config) -> tuple[MelodyConfig | None, ChromaSettings | None]:
    """Text by cross-attention (fuser.cross holds description), or a melody model: chroma (conditioners.self_wav,
    chroma_stem) and text both prepended (fuser.prepend)."""
    if cfg.get("conditioners.description.model", "t5") != "t5":
        raise CheckpointError(f"{cfg.source}: xp.cfg conditioners.description.model must be t5")
    cross, prepend = cfg.get("fuser.cross", None), cfg.get("fuser.prepend", None)
    if cfg.get("conditioners.self_wav", None) is None:
        if cross is not None and "description" not in cross:
            raise CheckpointError(f"{cfg.source}: xp.cfg fuser.cross {cross!r} does not hold description; fastgen "
                                  "runs text by cross-attention, or melody models")
        return None, None
    if cfg.get("conditioners.self_wav.model") != "chroma_stem":
        raise CheckpointError(f"{cfg.source}: xp.cfg conditioners.self_wav.model must be chroma_stem")
    if prepend is not None and set(prepend) != {"self_wav", "description"}:
        raise CheckpointError(f"{cfg.source}: xp.cfg fuser.prepend is {prepend!r}; a melody model prepends "
                              "self_wav and description")
    if not cfg.get("conditioners.self_wav.chroma_stem.argmax", True):
        raise CheckpointError(f"{cfg.source}: xp.cfg conditioners.self_wav.chroma_stem.argmax is false; fastgen "
                              "computes one-hot chroma, as transformers does")
    stem = "conditioners.self_wav.chroma_stem."
    sample_rate = cfg.int(stem + "sample_rate", cfg.int("sample_rate", 32000))
    n_fft = 2 ** cfg.int(stem + "radix2_exp", 14)
    duration = cfg.number("dataset.segment_duration", 30.0)
    chroma = ChromaSettings(sampling_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4,
                            chunk_length=max(1, round(duration)), num_chroma=cfg.int(stem + "n_chroma", 12))
    # audiocraft fits the chroma to the frames of a training segment (centred STFT: 1 + samples // hop)
    melody = MelodyConfig(num_chroma=chroma.num_chroma,
                          chroma_length=1 + int(duration * sample_rate) // chroma.hop_length)
    return melody, chroma


def model_config(lm: LanguageModelConfig, t5: dict, codec: dict, source: str) -> ModelConfig:
    """The ModelConfig a Hugging Face folder of the same model would give."""
    raw: dict[str, Any] = {
        "model_type": "musicgen_melody" if lm.melody is not None else "musicgen",
        "decoder": {"vocab_size": lm.card, "hidden_size": lm.dim, "num_hidden_layers": lm.num_layers,
                    "num_attention_heads": lm.num_heads, "ffn_dim": lm.ffn_dim, "num_codebooks": lm.n_q,
                    "audio_channels": lm.channels, "max_position_embeddings": MAX_POSITIONS,
                    "activation_function": lm.activation, "pad_token_id": lm.card},
        "text_encoder": t5, "audio_encoder": codec}
    if lm.melody is not None:
        raw.update(num_chroma=lm.melody.num_chroma, chroma_length=lm.melody.chroma_length)
    return ModelConfig.from_dict(raw, source=source)

"""The stages around the decoder, from transformers: the T5 text encoder (with its tokenizer) and EnCodec.

Both run in float32: they are a small share of the time, T5 is known to overflow in fp16, and the codec's output is
the product users hear."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fastgen.errors import CheckpointError
from fastgen.model.codec_convs import make_thread_invariant
from fastgen.model.loader import check_weights, load_submodule, take_prefixed

STAGE_DTYPE = torch.float32
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # T5's fast tokenizer, or its sentencepiece model
DECODE_BATCH = 8  # clips per EnCodec call: its activations grow with batch × samples (30 s clips: ~1 GB each)
# On a CPU each clip is decoded alone: a convolution's algorithm (and so its last bits) can change with the batch, and
# a request's audio must not depend on which requests finished beside it. A CUDA GPU batches for throughput.
CPU_DECODE_BATCH = 1


@contextlib.contextmanager
def _as_checkpoint_error(section: str):
    """transformers' own config checks and module construction fail in many ways (division by zero, IndexError …)
    on a malformed section: each becomes a CheckpointError naming the section."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"config.json: the {section} section cannot build its model "
                              f"({type(exc).__name__}: {str(exc)[:300]})") from None


class _TokenIdWarnings(logging.Filter):
    """transformers warns that MusicGen's pad/bos id (= vocab_size, the extra embedding row) lies outside the
    vocabulary whenever a MusicGen config is built (AutoTokenizer builds one from config.json), real checkpoints
    included. It is harmless for MusicGen."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("must be `None` or an integer within the vocabulary" in message
                    and ("pad_token_id" in message or "bos_token_id" in message))


@contextlib.contextmanager
def quiet_token_id_warnings() -> Iterator[None]:
    """Drop those two warnings (only) while transformers builds a MusicGen config: loading, building a tiny one."""
    loggers = [logging.getLogger(name) for name in (
        "transformers.configuration_utils", "transformers.models.musicgen.configuration_musicgen",
        "transformers.models.musicgen_melody.configuration_musicgen_melody")]
    quiet = _TokenIdWarnings()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class TextEncoder:
    def __init__(self, folder: Path, t5_config: dict, weights: dict[str, torch.Tensor], device: torch.device):
        from transformers import AutoTokenizer, T5Config, T5EncoderModel
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build a default tokenizer from nothing, turning most words into <unk>
            raise CheckpointError(f"{folder}: the tokenizer is missing (expected {' or '.join(TOKENIZER_FILES)} "
                                  "beside config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
        with _as_checkpoint_error("text_encoder"), torch.device("meta"):
            # no random init: every tensor comes from the checkpoint (assign=True)
            model = T5EncoderModel(T5Config.from_dict(t5_config))
        own = take_prefixed(weights, "text_encoder.")
        # the input embedding is tied to `shared`: exports store it once under either name
        if "shared.weight" in own:
            own.setdefault("encoder.embed_tokens.weight", own["shared.weight"])
        elif "encoder.embed_tokens.weight" in own:
            own["shared.weight"] = own["encoder.embed_tokens.weight"]
        self.model = load_submodule(model, own, "text_encoder", assign=True).to(device, STAGE_DTYPE).eval()
        self.device = device

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    @torch.inference_mode()
    def encode(self, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded batch → (last hidden states [n, T, Dt] float32, attention mask [n, T] int64)."""
        longest = max(len(ids) for ids in token_ids)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(token_ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
        for i, row in enumerate(token_ids):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


class AudioCodec:
    """EnCodec at 32 kHz: audio ↔ codes [K, frames]. Stereo MusicGen interleaves left/right codebooks."""

    def __init__(self, encodec_config: dict, weights: dict[str, torch.Tensor], device: torch.device,
                 audio_channels: int):
        from transformers import EncodecConfig, EncodecModel
        own = take_prefixed(weights, "audio_encoder.")
        with _as_checkpoint_error("audio_encoder"):
            config = EncodecConfig.from_dict(encodec_config)
            with torch.device("meta"):  # the checkpoint checked against the config before allocating anything
                shapes = EncodecModel(config).state_dict()
        # codebook bookkeeping buffers are training state; older exports may omit them
        optional = {k for k in shapes if k.endswith((".inited", ".cluster_size", ".embed_avg"))}
        check_weights(shapes, own, "audio_encoder", optional)
        with _as_checkpoint_error("audio_encoder"):
            # built for real, not on the meta device: EnCodec keeps non-persistent buffers (conv strides,
            # paddings) that a checkpoint does not carry
            model = EncodecModel(config)
        self.model = load_submodule(model, own, "audio_encoder", optional).to(device, STAGE_DTYPE).eval()
        if device.type == "cpu":  # the same audio at any thread count
            make_thread_invariant(self.model)
        self.device = device
        self.audio_channels = audio_channels
        self.sample_rate = config.sampling_rate

    @torch.inference_mode()
    def encode(self, audio: np.ndarray) -> torch.Tensor:
        """[channels, samples] float32 (channels = the model's) → codes [K, frames] int64 on the CPU."""
        per_channel = []
        for channel in audio:
            values = torch.from_numpy(np.ascontiguousarray(channel)).to(self.device, STAGE_DTYPE).view(1, 1, -1)
            codes = self.model.encode(values).audio_codes  # [1 chunk, 1, K_codec, frames]
            per_channel.append(codes[0, 0])
        if len(per_channel) == 1:
            return per_channel[0].long().cpu()
        left, right = per_channel
        return torch.stack([left, right], dim=1).reshape(-1, left.shape[-1]).long().cpu()  # l0 r0 l1 r1 …

    @torch.inference_mode()
    def decode(self, codes: list[torch.Tensor]) -> list[np.ndarray]:
        """Codes [K, frames] per request → audio [channels, samples] float32. On CUDA, requests of equal length are
        decoded together; different lengths are never padded into one batch (padding changes EnCodec's output). On a
        CPU each alone (CPU_DECODE_BATCH)."""
        batch_size = CPU_DECODE_BATCH if self.device.type == "cpu" else DECODE_BATCH
        results: list[np.ndarray | None] = [None] * len(codes)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(codes):
            by_length.setdefault(c.shape[-1], []).append(i)
        chunks = [group[i:i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
        for indices in chunks:
            batch = torch.stack([codes[i] for i in indices]).to(self.device)  # [n, K, frames]
            channels = [batch] if self.audio_channels == 1 else [batch[:, 0::2], batch[:, 1::2]]
            audio = torch.cat([self._decode(c) for c in channels], dim=1).float().cpu().numpy()
            for j, i in enumerate(indices):
                results[i] = np.ascontiguousarray(audio[j])
        return results  # type: ignore[return-value]

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes.unsqueeze(0), [None] * codes.shape[0]).audio_values  # [n, 1, samples]

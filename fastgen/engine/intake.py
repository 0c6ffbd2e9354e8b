"""Intake: what a caller submits (prompt, SamplingParams, audio or codes prompt, melody, request id) checked and turned
into a Request, each step bounded before it runs. Every error is a RequestError naming the parameter; nothing is
queued here (the Engine does that) and no engine lock is taken, so a bad request never waits behind good ones."""
from __future__ import annotations

import numbers
import threading
from typing import Any

import numpy as np

from fastgen.audio import prepare_audio_prompt
from fastgen.engine import longform
from fastgen.engine.request import Request
from fastgen.errors import RequestError
from fastgen.model.chroma import melody_chroma
from fastgen.model.musicgen import MusicgenModel
from fastgen.sampling_params import ResolvedParams, SamplingParams

MAX_ID_CHARS = 256
# a prompt's length in characters is bounded before tokenising (which is serialised): T5's sentencepiece tokens
# average a few characters, so this leaves room for any prompt within max_text_tokens
PROMPT_CHARS_PER_TOKEN = 32
# audio prompt sample rates accepted (the resampler is given nothing else: 2**62 Hz would hang it)
MIN_AUDIO_PROMPT_RATE, MAX_AUDIO_PROMPT_RATE = 1_000, 768_000


class RequestIntake:
    """Builds Requests for one engine: its model, its frame limits and its text-token limit."""

    def __init__(self, model: MusicgenModel, *, window_frames: int, max_frames: int, max_text_tokens: int) -> None:
        self.model = model
        self.frame_rate, self.sample_rate = model.config.frame_rate, model.config.sample_rate
        self.hop = self.sample_rate // self.frame_rate  # audio samples per codec frame
        self.window_frames, self.max_frames, self.max_text_tokens = window_frames, max_frames, max_text_tokens
        self.tokenizer_lock = threading.Lock()  # tokenizers are not safe to call from several threads at once

    def check_request_id(self, request_id: Any) -> None:
        if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS):
            raise RequestError(f"request_id must be a string of 1 to {MAX_ID_CHARS} characters, got "
                               f"{type(request_id).__name__} {str(request_id)[:40]!r}")

    def build(self, request_id: str, prompt: str | None, params: SamplingParams | None = None,
              audio_prompt: tuple[Any, int] | None = None, name: str = "prompt", codes_prompt: Any = None,
              melody: tuple[Any, int] | None = None) -> Request:
        """Validate and build a request (raises RequestError naming the bad parameter).
        ``codes_prompt`` (int [num_codebooks, frames], GenerationOutput.codes' layout) is continued like an audio
        prompt, without EnCodec. ``melody`` (waveform, sample_rate), for a melody checkpoint only, becomes its chroma
        here (the first chunk_length seconds: 30 s), which the request keeps instead of the audio.

        Safe from any thread, and every step is bounded before it runs: parameters and sizes are checked first, the
        audio prompt is resampled only once its rate and resampled length are known to be in range, and the prompt
        is tokenised (under a lock: tokenizers are not thread-safe) only once its length in characters is."""
        self._check_prompt(prompt, name)
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a fastgen.SamplingParams, got {type(params).__name__}")
        params = params.with_defaults(self.model.defaults)
        dec = self.model.config.decoder
        resolved = ResolvedParams.resolve(params, frame_rate=self.frame_rate, channel_codebooks=dec.channel_codebooks,
                                          vocab_size=dec.vocab_size)
        audio, prompt_frames = None, 0
        if audio_prompt is not None:
            waveform, rate = self._check_audio_prompt(audio_prompt, resolved.new_frames)
            try:
                audio = prepare_audio_prompt(waveform, rate, target_sample_rate=self.sample_rate,
                                             channels=dec.audio_channels, name="audio_prompt")
            except RequestError:
                raise
            except (ValueError, TypeError, MemoryError) as exc:
                raise RequestError(f"{type(exc).__name__}: {exc}" if isinstance(exc, MemoryError) else str(exc)) \
                    from None
            prompt_frames = -(-audio.shape[-1] // self.hop)
        prompt_codes = None
        if codes_prompt is not None:
            if audio is not None:
                raise RequestError("give either audio_prompt or codes_prompt, not both")
            prompt_codes = longform.as_codes(codes_prompt, dec.num_codebooks, dec.vocab_size, "codes_prompt")
            prompt_frames = prompt_codes.shape[1]
        stride = longform.stride_frames(params.extend_stride, self.window_frames, self.frame_rate)
        self._check_length(prompt_frames, resolved.new_frames)
        chroma = self._melody_chroma(melody) if melody is not None else None
        text_ids = None
        if prompt is not None:
            with self.tokenizer_lock:
                text_ids = self.model.text_encoder.tokenize(prompt)
            if len(text_ids) > self.max_text_tokens:
                raise RequestError(f"{name} is {len(text_ids)} tokens long; at most max_text_tokens="
                                   f"{self.max_text_tokens} are allowed")
        return Request(request_id, prompt, params, resolved, text_ids, audio, prompt_frames, dec.channel_codebooks,
                       window_frames=self.window_frames, stride_frames=stride, prompt_codes=prompt_codes,
                       chroma=chroma)

    def _check_prompt(self, prompt: Any, name: str) -> None:
        if prompt is None:
            return
        if not isinstance(prompt, str):
            raise RequestError(f"{name} must be a string or None (unconditional), got {type(prompt).__name__}")
        limit = PROMPT_CHARS_PER_TOKEN * self.max_text_tokens
        if len(prompt) > limit:  # tokenising is serialised: bound its cost before it runs
            raise RequestError(f"{name} is {len(prompt)} characters long; at most {limit} are allowed "
                               f"({PROMPT_CHARS_PER_TOKEN} × max_text_tokens={self.max_text_tokens})")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{name} is not valid Unicode text: character {exc.start} is "
                               f"{prompt[exc.start]!r} (a lone surrogate)") from None

    def _check_audio_prompt(self, audio_prompt: Any, new_frames: int) -> tuple[Any, int]:
        """The (waveform, sample_rate) pair with its rate in range and its length after resampling between one codec
        frame and what the request may span, checked on the shape alone: nothing is converted or resampled yet."""
        if not (isinstance(audio_prompt, tuple) and len(audio_prompt) == 2):
            raise RequestError("audio_prompt must be a (waveform, sample_rate) tuple")
        waveform, rate = audio_prompt
        _check_rate(rate, "audio_prompt")
        try:
            shape = tuple(waveform.shape) if hasattr(waveform, "shape") else np.shape(waveform)
        except (ValueError, TypeError):  # ragged nested lists: prepare_audio_prompt names the problem
            return waveform, int(rate)
        if len(shape) not in (1, 2) or shape[-1] == 0 or (len(shape) == 2 and shape[0] > 2):
            return waveform, int(rate)  # prepare_audio_prompt names the shape problem before it resamples
        samples = -(-int(shape[-1]) * self.sample_rate // int(rate))
        if samples < self.hop:
            raise RequestError(f"audio_prompt is {shape[-1] / rate * 1000:.2f} ms long; at least one codec frame "
                               f"({self.hop / self.sample_rate * 1000:.0f} ms) is needed")
        self._check_length(-(-samples // self.hop), new_frames)
        return waveform, int(rate)

    def _melody_chroma(self, melody: Any):
        """A melody checked as an audio prompt is (the same errors), then its chroma [frames, bins]."""
        if self.model.melody is None:
            raise RequestError("melody: this checkpoint is a text-to-music MusicGen (model_type musicgen); melody "
                               "conditioning needs a MusicGen-Melody checkpoint (model_type musicgen_melody, e.g. "
                               "facebook/musicgen-melody)")
        if not (isinstance(melody, tuple) and len(melody) == 2):
            raise RequestError("melody must be a (waveform, sample_rate) tuple")
        waveform, rate = melody
        _check_rate(rate, "melody")
        try:
            return melody_chroma(waveform, int(rate), self.model.chroma, name="melody")
        except RequestError:
            raise
        except (ValueError, TypeError, MemoryError) as exc:
            raise RequestError(f"{type(exc).__name__}: {exc}" if isinstance(exc, MemoryError) else str(exc)) \
                from None

    def _check_length(self, prompt_frames: int, new_frames: int) -> None:
        total = prompt_frames + new_frames
        if total > self.max_frames:
            raise RequestError(
                f"the request spans {total / self.frame_rate:.2f} s ({prompt_frames} prompt + "
                f"{new_frames} new frames), over the limit of {self.max_frames / self.frame_rate:.2f} s "
                f"({self.max_frames} frames) of this engine (EngineConfig.max_duration_s); shorten duration or the "
                f"audio prompt")


def _check_rate(rate: Any, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or \
            not MIN_AUDIO_PROMPT_RATE <= rate <= MAX_AUDIO_PROMPT_RATE:
        raise RequestError(f"{name} sample rate must be an integer number of Hz in "
                           f"[{MIN_AUDIO_PROMPT_RATE}, {MAX_AUDIO_PROMPT_RATE}], got {str(rate)[:40]}")

"""Streaming audio out of a running request: EnCodec decodes overlapping windows of the codes generated so far.

MusicGen's 32 kHz EnCodec is not causal (symmetric convolutions and an LSTM), so a window decoded with only the
frames before a point is wrong near its right edge and slightly off near its left edge. Each chunk therefore

- covers the frames whose codebooks are all complete (the delay pattern completes frame f only after codebook
  K − 1 has caught up, K − 1 steps later),
- decodes ``left_context_frames`` already emitted frames again in front, so the convolutions and the LSTM see the past,
- stops ``lookahead_frames`` before the window's right edge (that part is decoded again by the next window),
- and blends its first ``crossfade_frames`` linearly with the previous window's decode of the same frames.

The last chunk decodes up to the request's last frame, so the concatenated stream has exactly the length of the
one-shot decode of the same codes; it is also the request's output audio (there is no second, whole-clip decode). Its
agreement with the one-shot decode is measured in tests/test_streaming.py and bench/serve.py and stated in the
README. Windows of requests that reach a chunk boundary in the same engine step are decoded in one EnCodec
call when their lengths are equal (padding would change EnCodec's output), on the stage worker like the final decode.

A long request (fastgen/engine/longform.py) streams across its window boundaries as if it had one window: frames are
counted from the request's first, and a window's left context may reach back into the frames that already left the
slot (the engine plans a window's last chunk before its slot is re-prefilled).

Everything here is keyed on the request's own codes and progress, never on its batch-mates: the chunking of a request
is the same whatever else runs beside it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """How a request's audio is cut into chunks. Lengths in EnCodec frames (50 per second at 32 kHz) except the
    two chunk sizes, which are seconds of audio."""
    first_chunk_s: float = 0.3       # the first chunk is small: it sets the time to first audio
    interval_s: float = 1.0          # later chunks: fewer, larger codec calls
    left_context_frames: int = 16    # already emitted frames decoded again in front of each window
    lookahead_frames: int = 4        # frames decoded at a window's right edge but not emitted from it
    crossfade_frames: int = 1        # frames blended linearly between two windows' decodes at the seam

    def __post_init__(self) -> None:
        for name in ("first_chunk_s", "interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and 0 < value <= 30):
                raise ValueError(f"{name} must be a number of seconds in (0, 30], got {value!r}")
        for name in ("left_context_frames", "lookahead_frames", "crossfade_frames"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 250):
                raise ValueError(f"{name} must be an integer in [0, 250], got {value!r}")


@dataclass
class _StreamState:
    first_frames: int
    interval_frames: int
    emitted: int = 0                 # frames handed to a window so far (planned on the loop thread)
    chunks: int = 0
    tail: np.ndarray | None = None   # the last window's decode of the next crossfade frames (worker side)
    pieces: list[np.ndarray] = field(default_factory=list)  # the chunks cut so far (worker side)

    def whole(self) -> np.ndarray:
        """The stream so far as one clip (after the last window: the request's audio)."""
        return np.concatenate(self.pieces, axis=-1)


@dataclass
class Window:
    """One codec call's worth of a request: codes [K, frames] from ``start`` on, emitting frames [emit_from,
    emit_to) (``emit_to`` is None for the last chunk: up to the end)."""
    request: Any
    codes: torch.Tensor
    start: int
    emit_from: int
    emit_to: int | None
    state: _StreamState
    fade: int = 0                    # crossfade frames kept after the chunk for the next window to blend into
    all_codes: Any = None            # the last window: all of the request's codes [K, total_frames] (for its output)
    ready: Any = None                # CUDA event the codes are ready after (copied on the loop's stream)


@dataclass
class AudioStreamer:
    """Plans windows on the engine's loop thread (``due``, ``final``) and decodes them on the stage worker
    (``decode``). ``read_codes(request, start, end)`` returns a running request's codes [K, end − start] (delay
    removed) for its frames [start, end) on its device, counted from its first frame across long-form windows
    (ModelRunner.request_codes), ``request.complete_frames`` how many are complete; ``decode_codes`` is the codec's
    batched decode (list of [K, frames] → list of [C, samples])."""
    read_codes: Callable[[Any, int, int], torch.Tensor]
    decode_codes: Callable[[list[torch.Tensor]], list[np.ndarray]]
    hop: int                          # samples per frame
    frame_rate: int
    config: StreamConfig = field(default_factory=StreamConfig)
    _states: dict[str, tuple[StreamConfig, _StreamState]] = field(default_factory=dict)

    def start(self, request: Any, config: StreamConfig | None = None) -> bool:
        """Stream ``request`` from its first frame on (also when it is already running: the first chunk then
        catches up). Returns False if it already streams."""
        if request.request_id in self._states:
            return False
        config = config or self.config
        state = _StreamState(max(1, round(config.first_chunk_s * self.frame_rate)),
                             max(1, round(config.interval_s * self.frame_rate)))
        self._states[request.request_id] = (config, state)
        return True

    def streaming(self, request: Any) -> bool:
        return request.request_id in self._states

    def drop(self, request: Any) -> None:
        self._states.pop(request.request_id, None)

    @property
    def active(self) -> bool:
        """Whether any request streams (the engine skips the per-step check otherwise)."""
        return bool(self._states)

    def due(self, requests: list[Any]) -> list[Window]:
        """Windows of running (not finishing) requests that passed their next chunk boundary in the last step."""
        windows = []
        for request in requests:
            entry = self._states.get(request.request_id)
            if entry is None:
                continue
            config, state = entry
            emit_to = request.complete_frames - config.lookahead_frames - config.crossfade_frames
            wanted = state.first_frames if state.chunks == 0 else state.interval_frames
            if emit_to - state.emitted < wanted:
                continue
            start = max(0, state.emitted - config.left_context_frames)
            end = emit_to + config.crossfade_frames + config.lookahead_frames
            codes = self.read_codes(request, start, end).clone()  # the slot keeps being written
            ready = None
            if codes.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
            windows.append(Window(request, codes, start, state.emitted, emit_to, state, config.crossfade_frames, ready))
            state.emitted, state.chunks = emit_to, state.chunks + 1
        return windows

    def final(self, request: Any, codes: torch.Tensor) -> Window | None:
        """The last window of a finished request (``codes``: all of its codes [K, total_frames]), or None if it
        does not stream. Ends its stream state."""
        entry = self._states.pop(request.request_id, None)
        if entry is None:
            return None
        config, state = entry
        start = max(0, state.emitted - config.left_context_frames)
        return Window(request, codes[:, start:], start, state.emitted, None, state, all_codes=codes)

    @torch.inference_mode()
    def decode(self, windows: list[Window]) -> list[np.ndarray]:
        """Stage-worker side: decode the windows (equal lengths batched) and cut each one's chunk, blended into the
        previous window's tail. Jobs run in submission order, so a request's windows are cut in order."""
        stream = torch.cuda.current_stream() if any(w.ready is not None for w in windows) else None
        for w in windows:
            if w.ready is not None:
                stream.wait_event(w.ready)
                w.codes.record_stream(stream)
        waves = self.decode_codes([w.codes for w in windows])
        return [self._cut(w, wave) for w, wave in zip(windows, waves)]

    def _cut(self, window: Window, wave: np.ndarray) -> np.ndarray:
        state, hop = window.state, self.hop
        begin = (window.emit_from - window.start) * hop
        end = None if window.emit_to is None else (window.emit_to - window.start) * hop
        chunk = np.array(wave[:, begin:end], dtype=np.float32)
        if state.tail is not None:
            fade = min(state.tail.shape[-1], chunk.shape[-1])
            ramp = (np.arange(fade, dtype=np.float32) + 0.5) / fade
            chunk[:, :fade] = state.tail[:, :fade] * (1 - ramp) + chunk[:, :fade] * ramp
        state.tail = None
        if end is not None and window.fade:
            state.tail = np.array(wave[:, end:end + window.fade * hop], dtype=np.float32)
        state.pieces.append(chunk)
        return chunk
